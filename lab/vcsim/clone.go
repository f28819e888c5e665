package main

// vcsim 0.24 puts a clone on its source's host whatever CloneSpec.location.host says; vCenter
// puts it on that host. In front of the SOAP endpoint, a CloneVM_Task that names a host is
// served by vcsim, then, before its answer goes out, the clone is moved to that host: the
// client sees the task's result where vCenter would have put it.

import (
	"bytes"
	"encoding/xml"
	"io/ioutil"
	"log"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

var taskInAnswer = regexp.MustCompile(`<returnval type="Task">([^<]+)</returnval>`)

func placeClones(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || (r.URL.Path != "/sdk" && r.URL.Path != "/sdk/vimService") {
			next.ServeHTTP(w, r)
			return
		}
		body, err := ioutil.ReadAll(r.Body)
		_ = r.Body.Close()
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		r.Body = ioutil.NopCloser(bytes.NewReader(body))
		host, ok := cloneHost(body)
		if !ok {
			next.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		next.ServeHTTP(rec, r)
		if m := taskInAnswer.FindSubmatch(rec.Body.Bytes()); m != nil {
			place(types.ManagedObjectReference{Type: "Task", Value: strings.TrimSpace(string(m[1]))}, host)
		}
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		_, _ = w.Write(rec.Body.Bytes())
	})
}

// cloneHost is the host a CloneVM_Task's spec.location names, if the call is one and names one.
func cloneHost(body []byte) (types.ManagedObjectReference, bool) {
	var none types.ManagedObjectReference
	if method, _, ok := sniff(body); !ok || method != "CloneVM_Task" {
		return none, false
	}
	d := xml.NewDecoder(bytes.NewReader(body))
	var path []string
	for {
		tok, err := d.Token()
		if err != nil {
			return none, false
		}
		switch t := tok.(type) {
		case xml.StartElement:
			path = append(path, t.Name.Local)
			n := len(path)
			if n >= 3 && path[n-1] == "host" && path[n-2] == "location" && path[n-3] == "spec" {
				var v struct {
					Value string `xml:",chardata"`
				}
				if d.DecodeElement(&v, &t) != nil {
					return none, false
				}
				return types.ManagedObjectReference{Type: "HostSystem", Value: strings.TrimSpace(v.Value)}, true
			}
		case xml.EndElement:
			path = path[:len(path)-1]
		}
	}
}

// place waits for the clone task to end and moves its VM to the host asked for.
func place(ref types.ManagedObjectReference, host types.ManagedObjectReference) {
	task, ok := simulator.Map.Get(ref).(*simulator.Task)
	if !ok {
		return
	}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		var info types.TaskInfo
		simulator.Map.WithLock(task, func() { info = task.Info })
		switch info.State {
		case types.TaskInfoStateSuccess:
			clone, ok := info.Result.(types.ManagedObjectReference)
			vm, isVM := simulator.Map.Get(clone).(*simulator.VirtualMachine)
			if _, isHost := simulator.Map.Get(host).(*simulator.HostSystem); ok && isVM && isHost {
				if from := vmHost(vm); from != host {
					placeVM(vm, from, host, false)
					log.Printf("drflow-clone: %s placed on %s as its clone spec asked", vm.Name, hostName(host))
				}
			}
			return
		case types.TaskInfoStateError:
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}
