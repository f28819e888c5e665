// Command vcsim-lab serves a vCenter simulator (govmomi 0.24 simulator package) with the drflow lab
// inventory: datacenters "prod" and "dr" (or only those named by -sites: production has a vCenter
// per site, and the lab runs one launcher per site), each with a cluster of one ESXi host per
// protection group (VM <group>-<site> on esx-<site>-NN, so a dead host takes one VM down, not the
// site) and a spare host for vSphere HA restarts, and an isolated port group on every "dr" host
// for DR drills. It writes a JSON description of what it serves to -info once the inventory is
// ready, so the caller can wait for that file instead of polling the port.
// With -twins, each named VM is created in every datacenter under the very same name (a DR VM
// named like the VM it protects, as many shops do), on a host of their own; with -tls, vCenter is
// served over HTTPS with a self-signed certificate, as a fresh vCenter is.
//
// Fault hooks (POST, JSON answers) make the simulator fail as real vCenter does; see faults below.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"encoding/xml"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/simulator/esx"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
	vimxml "github.com/vmware/govmomi/vim25/xml"
)

type vmInfo struct {
	Datacenter string `json:"datacenter"`
	EsxHost    string `json:"esx_host"`
}

type info struct {
	URL               string              `json:"url"`
	Host              string              `json:"host"`
	Port              int                 `json:"port"`
	Pid               int                 `json:"pid"`
	Sites             []string            `json:"sites"`
	VMs               map[string]vmInfo   `json:"vms"`
	Hosts             map[string][]string `json:"hosts"`       // datacenter -> ESXi host names
	SpareHosts        map[string]string   `json:"spare_hosts"` // datacenter -> the HA spare
	IsolatedPortgroup string              `json:"isolated_portgroup"`
	IsolatedVswitch   string              `json:"isolated_vswitch"`
	Twins             []string            `json:"twins"`
	Template          string              `json:"template,omitempty"`
}

var knownSites = []string{"prod", "dr"}

func main() {
	port := flag.Int("port", 0, "TCP port (0: pick a free one)")
	listen := flag.String("listen", "127.0.0.1", "address to serve on (a site's vCenter address)")
	sitesFlag := flag.String("sites", "prod,dr", "comma-separated datacenters to serve: prod, dr or both")
	groups := flag.String("groups", "", "comma-separated protection group names")
	infoPath := flag.String("info", "", "write the served inventory as JSON to this file when ready")
	isolated := flag.String("isolated-portgroup", "drflow-isolated", "isolated port group in dr")
	verbose := flag.Bool("verbose", false, "keep the property collector's per-call log lines")
	twins := flag.String("twins", "", "comma-separated VM names created in every datacenter alike")
	useTLS := flag.Bool("tls", false, "serve HTTPS with a self-signed certificate")
	lone := flag.String("lone", "", "comma-separated VMs NAME-prod created in prod only (no DR twin): lone databases to protect")
	template := flag.String("template", "", "name of a VM template created in dr (powered off, marked as a template)")
	guests := flag.String("guests", "", "JSON file naming each VM's namespace, directories and guest login (guest operations)")
	flag.Parse()
	if !*verbose {
		// A power bridge long-polls WaitForUpdatesEx: vcsim would log each call, every second.
		log.SetOutput(quietWriter{os.Stderr})
	}
	sites, err := parseSites(*sitesFlag)
	if err == nil && net.ParseIP(*listen) == nil {
		err = fmt.Errorf("-listen %q is not an IP address", *listen)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vcsim-lab:", err)
		os.Exit(2)
	}
	opts := options{port: *port, listen: *listen, sites: sites, groups: splitGroups(*groups),
		twins: splitGroups(*twins), infoPath: *infoPath, isolated: *isolated, tls: *useTLS,
		guests: *guests, lone: splitGroups(*lone), template: *template}
	if err := run(opts); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim-lab:", err)
		os.Exit(1)
	}
}

type options struct {
	port          int
	listen        string
	sites         []string
	groups, twins []string
	infoPath      string
	isolated      string
	tls           bool
	guests        string
	lone          []string
	template      string
}

func parseSites(s string) ([]string, error) {
	var out []string
	for _, site := range splitGroups(s) {
		ok := false
		for _, k := range knownSites {
			ok = ok || site == k
		}
		if !ok {
			return nil, fmt.Errorf("-sites: unknown site %q (known: prod, dr)", site)
		}
		for _, seen := range out {
			if seen == site {
				return nil, fmt.Errorf("-sites: %q given twice", site)
			}
		}
		out = append(out, site)
	}
	if len(out) == 0 {
		return nil, errors.New("-sites: name at least one site")
	}
	return out, nil
}

var chatter = []string{"MaxWaitSeconds exceeded", "WaitForUpdates canceled", " updates to ", " changes\n"}

// quietWriter drops the property collector's routine lines and keeps the rest (events, errors, panics).
type quietWriter struct{ w io.Writer }

func (q quietWriter) Write(p []byte) (int, error) {
	for _, c := range chatter {
		if bytes.Contains(p, []byte(c)) {
			return len(p), nil
		}
	}
	return q.w.Write(p)
}

func splitGroups(s string) []string {
	var out []string
	for _, g := range strings.Split(s, ",") {
		if g = strings.TrimSpace(g); g != "" {
			out = append(out, g)
		}
	}
	return out
}

func run(o options) error {
	m := simulator.VPX()
	m.Datacenter = len(o.sites)
	m.Host = 0
	// One cluster per datacenter (vSphere HA restarts VMs within a cluster): a host per group,
	// one for the twins if any, and the spare.
	m.Cluster = 1
	m.ClusterHost = len(o.groups) + len(o.lone) + 1
	if len(o.twins) > 0 {
		m.ClusterHost++
	}
	m.Portgroup = 0 // VMs then use the standard "VM Network", which a NIC edit can move off
	m.Machine = 0   // no default VMs: only ours
	m.Datastore = 1
	if err := m.Create(); err != nil {
		return fmt.Errorf("create model: %w", err)
	}
	defer m.Remove()
	// Datastore directories live under TMPDIR: remove them on a polite stop.
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		m.Remove()
		os.Exit(0)
	}()

	addr := net.JoinHostPort(o.listen, strconv.Itoa(o.port))
	// vcsim panics on a busy port or an address the host does not have; say it in one line instead.
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	_ = l.Close()
	m.Service.TLS = nil
	if o.tls {
		m.Service.TLS = new(tls.Config) // the simulator then makes a self-signed certificate
	}
	m.Service.Listen = &url.URL{Host: addr}
	f := newFaults(m.ServiceContent.TaskManager)
	s := m.Service.NewServer()
	// In front of the SOAP endpoint: power operations on a VM whose host is lost hang or fail
	// there, without holding the simulator's lock on the VM (the property collector takes it too).
	// Swapped before any client knows the address: the server reads the handler per request.
	s.Server.Config.Handler = placeClones(f.front(s.Server.Config.Handler))
	registerDisableMethodHook(m.Service)
	f.register(m.Service)
	registerGuestOperations(m.Service, o.guests, o.tls)

	ctx := context.Background()
	c, err := govmomi.NewClient(ctx, s.URL, true) // insecure: our own self-signed certificate
	if err != nil {
		return fmt.Errorf("connect to own simulator: %w", err)
	}
	out := info{VMs: map[string]vmInfo{}, Hosts: map[string][]string{}, SpareHosts: map[string]string{},
		IsolatedPortgroup: o.isolated, Pid: os.Getpid(), Twins: o.twins, Sites: o.sites}
	if err := buildInventory(ctx, c, o, f, &out); err != nil {
		return fmt.Errorf("inventory: %w", err)
	}
	_ = c.Logout(ctx)

	u := *s.URL
	u.User = nil
	out.URL = u.String()
	out.Host = u.Hostname()
	out.Port, _ = strconv.Atoi(u.Port())
	if o.infoPath != "" {
		if err := writeAtomic(o.infoPath, out); err != nil {
			return err
		}
	}
	fmt.Println(out.URL)
	select {} // serve until signalled
}

func buildInventory(ctx context.Context, c *govmomi.Client, o options, f *faults, out *info) error {
	finder := find.NewFinder(c.Client, false)
	for i, site := range o.sites {
		dc, err := finder.Datacenter(ctx, fmt.Sprintf("DC%d", i))
		if err != nil {
			return err
		}
		if err := waitTask(dc.Common.Rename(ctx, site)); err != nil {
			return fmt.Errorf("rename datacenter to %s: %w", site, err)
		}
		finder.SetDatacenter(dc)
		cluster, err := finder.DefaultClusterComputeResource(ctx)
		if err != nil {
			return err
		}
		if err := waitTask(cluster.Common.Rename(ctx, site+"-cluster")); err != nil {
			return fmt.Errorf("rename cluster: %w", err)
		}
		pool, err := cluster.ResourcePool(ctx)
		if err != nil {
			return err
		}
		folders, err := dc.Folders(ctx)
		if err != nil {
			return err
		}
		simCluster := simulator.Map.Get(cluster.Reference()).(*simulator.ClusterComputeResource)
		refs := append([]types.ManagedObjectReference(nil), simCluster.Host...)
		if len(refs) != o.hostCount() {
			return fmt.Errorf("cluster of %s has %d hosts, expected %d", site, len(refs), o.hostCount())
		}
		hosts := make([]*object.HostSystem, len(refs))
		for n, ref := range refs {
			hosts[n] = object.NewHostSystem(c.Client, ref)
			name := fmt.Sprintf("esx-%s-%02d", site, n+1)
			switch {
			case n == len(refs)-1:
				name = "esx-" + site + "-spare"
				out.SpareHosts[site] = name
				f.setSpare(site, ref)
			case n == len(o.groups)+len(o.lone):
				name = "esx-" + site + "-twins"
			}
			renameHost(hosts[n], name)
			giveUplink(hosts[n])
			out.Hosts[site] = append(out.Hosts[site], name)
		}
		for n, g := range o.groups {
			name := g + "-" + site
			if err := createVM(ctx, c, folders.VmFolder, pool, hosts[n], name, true); err != nil {
				return fmt.Errorf("create VM %s: %w", name, err)
			}
			out.VMs[name] = vmInfo{Datacenter: site, EsxHost: out.Hosts[site][n]}
		}
		// A lone VM's host exists at every site: where its standby will be created at DR.
		for k, g := range o.lone {
			n := len(o.groups) + k
			if site != "prod" {
				continue
			}
			name := g + "-" + site
			if err := createVM(ctx, c, folders.VmFolder, pool, hosts[n], name, true); err != nil {
				return fmt.Errorf("create VM %s: %w", name, err)
			}
			out.VMs[name] = vmInfo{Datacenter: site, EsxHost: out.Hosts[site][n]}
		}
		if site == "dr" && o.template != "" {
			if err := createTemplate(ctx, c, folders.VmFolder, pool, hosts[len(hosts)-1], o.template); err != nil {
				return fmt.Errorf("create template %s: %w", o.template, err)
			}
			out.Template = o.template
		}
		for _, name := range o.twins {
			if err := createVM(ctx, c, folders.VmFolder, pool, hosts[len(o.groups)+len(o.lone)], name, true); err != nil {
				return fmt.Errorf("create VM %s in %s: %w", name, site, err)
			}
		}
		if site == "dr" {
			// Every DR host carries it: a drill clones the standby VM on the standby's own host.
			vswitch, err := addIsolatedPortgroup(ctx, finder, hosts, o.isolated)
			if err != nil {
				return fmt.Errorf("isolated port group: %w", err)
			}
			out.IsolatedVswitch = vswitch
		}
	}
	return nil
}

func (o options) hostCount() int {
	n := len(o.groups) + len(o.lone) + 1
	if len(o.twins) > 0 {
		n++
	}
	return n
}

func waitTask(task *object.Task, err error) error {
	if err != nil {
		return err
	}
	return task.Wait(context.Background())
}

// renameHost gives the standalone host a site-specific name (Model.Create names it DC0_H0, and
// vcsim 0.24 has no Rename_Task for hosts). Runs before any outside client connects.
func renameHost(host *object.HostSystem, name string) {
	h := simulator.Map.Get(host.Reference()).(*simulator.HostSystem)
	simulator.Map.Update(h, []types.PropertyChange{
		{Name: "name", Val: name},
		{Name: "summary.config.name", Val: name},
	})
	if h.Parent != nil {
		if cr, ok := simulator.Map.Get(*h.Parent).(*mo.ComputeResource); ok {
			simulator.Map.Update(cr, []types.PropertyChange{{Name: "name", Val: name}})
		}
	}
}

// giveUplink makes the host network system's vSwitch0 look like the real thing (vmnic0 bridged),
// so an isolated switch is distinguishable from a connected one through the API.
func giveUplink(host *object.HostSystem) {
	h := simulator.Map.Get(host.Reference()).(*simulator.HostSystem)
	ns := simulator.Map.Get(h.ConfigManager.NetworkSystem.Reference()).(*simulator.HostNetworkSystem)
	model := esx.HostConfigInfo.Network.Vswitch[0]
	for i := range ns.NetworkInfo.Vswitch {
		sw := &ns.NetworkInfo.Vswitch[i]
		if sw.Name == model.Name {
			sw.Key = model.Key
			sw.Pnic = model.Pnic
			sw.Spec = model.Spec
			sw.Mtu = model.Mtu
			sw.NumPorts = model.NumPorts
		}
	}
	ns.NetworkInfo.Pnic = esx.HostConfigInfo.Network.Pnic
}

func createVM(ctx context.Context, c *govmomi.Client, folder *object.Folder, pool *object.ResourcePool,
	host *object.HostSystem, name string, powerOn bool) error {
	_, err := newVM(ctx, c, folder, pool, host, name, powerOn)
	return err
}

func newVM(ctx context.Context, c *govmomi.Client, folder *object.Folder, pool *object.ResourcePool,
	host *object.HostSystem, name string, powerOn bool) (*object.VirtualMachine, error) {
	// Same hardware as the simulator's default VMs: one disk, a CD-ROM and one NIC on "VM Network".
	config := types.VirtualMachineConfigSpec{
		Name:    name,
		GuestId: string(types.VirtualMachineGuestOsIdentifierOtherGuest),
		Files:   &types.VirtualMachineFileInfo{VmPathName: "[LocalDS_0]"},
	}
	var devices object.VirtualDeviceList
	scsi, err := devices.CreateSCSIController("pvscsi")
	if err != nil {
		return nil, err
	}
	ide, err := devices.CreateIDEController()
	if err != nil {
		return nil, err
	}
	cdrom, err := devices.CreateCdrom(ide.(*types.VirtualIDEController))
	if err != nil {
		return nil, err
	}
	disk := devices.CreateDisk(scsi.(types.BaseVirtualController), types.ManagedObjectReference{},
		config.Files.VmPathName+" "+path.Join(name, "disk1.vmdk"))
	disk.CapacityInKB = 1024
	nic := esx.EthernetCard
	backing := *nic.Backing.(*types.VirtualEthernetCardNetworkBackingInfo)
	nic.Backing = &backing
	devices = append(devices, scsi, cdrom, disk, &nic)
	if config.DeviceChange, err = devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd); err != nil {
		return nil, err
	}
	task, err := folder.CreateVM(ctx, config, pool, host)
	if err != nil {
		return nil, err
	}
	res, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return nil, err
	}
	vm := object.NewVirtualMachine(c.Client, res.Result.(types.ManagedObjectReference))
	if !powerOn {
		return vm, nil
	}
	return vm, waitTask(vm.PowerOn(ctx))
}

// createTemplate makes the VM template new VMs are cloned from (a database server image).
func createTemplate(ctx context.Context, c *govmomi.Client, folder *object.Folder, pool *object.ResourcePool,
	host *object.HostSystem, name string) error {
	vm, err := newVM(ctx, c, folder, pool, host, name, false)
	if err != nil {
		return err
	}
	return vm.MarkAsTemplate(ctx)
}

// addIsolatedPortgroup adds, on each host, a vSwitch without any physical NIC and a port group on
// it: a VM attached there can talk to other VMs on the same switch and nothing else.
func addIsolatedPortgroup(ctx context.Context, finder *find.Finder, hosts []*object.HostSystem,
	pgName string) (string, error) {
	const vswitch = "vSwitch-drflow-isolated"
	spec := types.HostVirtualSwitchSpec{NumPorts: 128} // no Bridge: no uplink
	pg := types.HostPortGroupSpec{Name: pgName, VswitchName: vswitch, Policy: types.HostNetworkPolicy{}}
	var network types.ManagedObjectReference
	for n, host := range hosts {
		ns, err := host.ConfigManager().NetworkSystem(ctx)
		if err != nil {
			return "", err
		}
		if err := ns.AddVirtualSwitch(ctx, vswitch, &spec); err != nil {
			return "", err
		}
		sim := simulator.Map.Get(ns.Reference()).(*simulator.HostNetworkSystem)
		if n == 0 {
			if err := ns.AddPortGroup(ctx, pg); err != nil {
				return "", err
			}
			net, err := finder.Network(ctx, pgName)
			if err != nil {
				return "", err
			}
			network = net.Reference()
		} else {
			// vcsim 0.24 makes the port group's network datacenter-wide and refuses a second
			// AddPortGroup of the same name (DuplicateName): record it on the host directly.
			sim.NetworkInfo.Portgroup = append(sim.NetworkInfo.Portgroup, types.HostPortGroup{
				Key: "key-vim.host.PortGroup-" + pgName, Spec: pg})
			for i := range sim.NetworkInfo.Vswitch {
				if sw := &sim.NetworkInfo.Vswitch[i]; sw.Name == vswitch {
					sw.Portgroup = append(sw.Portgroup, pgName)
				}
			}
		}
		// vcsim 0.24 records only the name of an added switch; fill in what a real host reports.
		for i := range sim.NetworkInfo.Vswitch {
			sw := &sim.NetworkInfo.Vswitch[i]
			if sw.Name == vswitch {
				sw.Key = "key-vim.host.VirtualSwitch-" + vswitch
				sw.Spec = spec
				sw.NumPorts = spec.NumPorts
				sw.Mtu = 1500
			}
		}
		for i := range sim.NetworkInfo.Portgroup {
			if p := &sim.NetworkInfo.Portgroup[i]; p.Spec.Name == pgName {
				p.Vswitch = "key-vim.host.VirtualSwitch-" + vswitch
			}
		}
		// A real host lists the networks it can reach; vcsim only adds it to the datacenter.
		h := simulator.Map.Get(host.Reference()).(*simulator.HostSystem)
		simulator.Map.Update(h, []types.PropertyChange{
			{Name: "network", Val: append(append([]types.ManagedObjectReference(nil), h.Network...), network)},
		})
		if netObj, ok := simulator.Map.Get(network).(*mo.Network); ok {
			simulator.Map.Update(netObj, []types.PropertyChange{
				{Name: "host", Val: append(append([]types.ManagedObjectReference(nil), netObj.Host...), host.Reference())},
			})
		}
	}
	return vswitch, nil
}

func writeAtomic(p string, v interface{}) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := ioutil.TempFile(filepath.Dir(p), ".vcsim-info-")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), p)
}

// registerDisableMethodHook serves POST /drflow/disabled-methods?vm=NAME&method=PowerOffVM_Task
// (add `&enable=1` to lift it): vCenter then refuses that call on that VM with a MethodDisabled
// fault, as a real vCenter does for methods disabled through AuthorizationManager.DisableMethods
// (which vcsim 0.24 does not implement). Lets a test make a fence fail for real.
func registerDisableMethodHook(svc *simulator.Service) {
	svc.Handle("/drflow/disabled-methods", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "POST only", http.StatusMethodNotAllowed)
			return
		}
		q := r.URL.Query()
		vmName, method := q.Get("vm"), q.Get("method")
		if vmName == "" || method == "" {
			http.Error(w, "vm and method are required", http.StatusBadRequest)
			return
		}
		// vcsim's dispatcher compares against its Go method name: PowerOffVM_Task → PowerOffVMTask.
		method = strings.TrimSuffix(method, "_Task")
		if method != q.Get("method") {
			method += "Task"
		}
		for _, e := range simulator.Map.All("VirtualMachine") {
			vm, ok := e.(*simulator.VirtualMachine)
			if !ok || vm.Name != vmName {
				continue
			}
			simulator.Map.WithLock(vm, func() {
				var kept []string
				for _, dm := range vm.DisabledMethod {
					if dm != method {
						kept = append(kept, dm)
					}
				}
				if q.Get("enable") == "" {
					kept = append(kept, method)
				}
				vm.DisabledMethod = kept
			})
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(map[string]interface{}{"vm": vmName, "disabled": vm.DisabledMethod})
			return
		}
		http.Error(w, "no VM named "+vmName, http.StatusNotFound)
	}))
}

// ---- faults ---------------------------------------------------------------------------------
//
// Real vCenter (not vcsim) when an ESXi host stops heartbeating: for 60 s nothing shows (the host
// is `connected`, its VMs `connected` and `poweredOn`); then the host is `notResponding` and its
// VMs `disconnected`, their powerState frozen at its last value. Power operations on those VMs do
// not complete: a task started before the host is declared lost runs until vCenter gives up on
// the host and fails with HostCommunication; one started afterwards fails at once with
// InvalidHostConnectionState. The hooks below make the simulator behave so:
//
//	POST /drflow/host-loss?vm=NAME[&not_responding_after=S][&mgmt_only=1]
//	POST /drflow/host-restore?vm=NAME[&ha=1]
//	POST /drflow/stun-task?vm=NAME&task=snapshot|vmotion&seconds=S
//
// (each also takes &datacenter=DC when a VM name exists in two datacenters). Each answers JSON
// with the instant (Unix seconds) it took effect and logs one "drflow-fault" line with it.

type hostLoss struct {
	host            types.ManagedObjectReference
	since           time.Time
	notRespondingAt time.Time
	mgmtOnly        bool
	over            chan struct{} // closed when the host is restored
}

type faults struct {
	mu          sync.Mutex
	lost        map[types.ManagedObjectReference]*hostLoss                    // by host
	spare       map[string]types.ManagedObjectReference                       // datacenter -> spare host
	home        map[types.ManagedObjectReference]types.ManagedObjectReference // VM -> host before any move
	taskManager types.ManagedObjectReference
	log         *log.Logger
}

func newFaults(taskManager *types.ManagedObjectReference) *faults {
	f := &faults{
		lost:  map[types.ManagedObjectReference]*hostLoss{},
		spare: map[string]types.ManagedObjectReference{},
		home:  map[types.ManagedObjectReference]types.ManagedObjectReference{},
		log:   log.New(os.Stderr, "drflow-fault ", 0),
	}
	if taskManager != nil {
		f.taskManager = *taskManager
	}
	return f
}

func (f *faults) setSpare(datacenter string, host types.ManagedObjectReference) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.spare[datacenter] = host
}

func (f *faults) register(svc *simulator.Service) {
	svc.Handle("/drflow/host-loss", postOnly(f.serveHostLoss))
	svc.Handle("/drflow/host-restore", postOnly(f.serveHostRestore))
	svc.Handle("/drflow/stun-task", postOnly(f.serveStunTask))
}

func epoch(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

// httpError carries the status code a hook answers with.
type httpError struct {
	code int
	msg  string
}

func (e *httpError) Error() string { return e.msg }

func badRequest(format string, a ...interface{}) error {
	return &httpError{http.StatusBadRequest, fmt.Sprintf(format, a...)}
}

func postOnly(h func(url.Values) (interface{}, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "POST only"})
			return
		}
		out, err := h(r.URL.Query())
		if err != nil {
			code := http.StatusInternalServerError
			var he *httpError
			if errors.As(err, &he) {
				code = he.code
			}
			writeJSON(w, code, map[string]string{"error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, out)
	})
}

func writeJSON(w http.ResponseWriter, code int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func parseFlag(q url.Values, name string) (bool, error) {
	switch q.Get(name) {
	case "", "0", "false":
		return false, nil
	case "1", "true":
		return true, nil
	}
	return false, badRequest("%s must be 1 or 0, got %q", name, q.Get(name))
}

func parseSeconds(q url.Values, name string, def, min, max float64) (float64, error) {
	s := q.Get(name)
	if s == "" {
		if def < 0 {
			return 0, badRequest("%s is required", name)
		}
		return def, nil
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v != v || v < min || v > max {
		return 0, badRequest("%s must be a number of seconds in [%g, %g], got %q", name, min, max, s)
	}
	return v, nil
}

// findVM finds the one VM called name (in datacenter dc, if given): 404 if none, 400 if several.
func findVM(q url.Values) (*simulator.VirtualMachine, error) {
	name, dc := q.Get("vm"), q.Get("datacenter")
	if name == "" {
		return nil, badRequest("vm is required")
	}
	var found []*simulator.VirtualMachine
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm, ok := e.(*simulator.VirtualMachine)
		if ok && vm.Name == name && (dc == "" || datacenterOf(vm.Self) == dc) {
			found = append(found, vm)
		}
	}
	switch len(found) {
	case 0:
		return nil, &httpError{http.StatusNotFound, "no VM named " + name}
	case 1:
		return found[0], nil
	}
	return nil, badRequest("%d VMs are named %s: add datacenter=", len(found), name)
}

func datacenterOf(ref types.ManagedObjectReference) string {
	for i := 0; i < 64; i++ {
		obj := simulator.Map.Get(ref)
		if dc, ok := obj.(*simulator.Datacenter); ok {
			return dc.Name
		}
		e, ok := obj.(mo.Entity)
		if !ok || e.Entity().Parent == nil {
			return ""
		}
		ref = *e.Entity().Parent
	}
	return ""
}

func vmHost(vm *simulator.VirtualMachine) (host types.ManagedObjectReference) {
	simulator.Map.WithLock(vm, func() {
		if vm.Runtime.Host != nil {
			host = *vm.Runtime.Host
		}
	})
	return host
}

func hostName(ref types.ManagedObjectReference) string {
	if h, ok := simulator.Map.Get(ref).(*simulator.HostSystem); ok {
		return h.Name
	}
	return ref.Value
}

func (f *faults) lossOf(host types.ManagedObjectReference) *hostLoss {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lost[host]
}

func (f *faults) anyLost() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.lost) > 0
}

// setConnection sets a host's connection state and that of every VM on it.
func setConnection(host types.ManagedObjectReference, hostState types.HostSystemConnectionState,
	vmState types.VirtualMachineConnectionState) {
	h, ok := simulator.Map.Get(host).(*simulator.HostSystem)
	if !ok {
		return
	}
	var vms []types.ManagedObjectReference
	simulator.Map.WithLock(h, func() {
		simulator.Map.Update(h, []types.PropertyChange{
			{Name: "runtime.connectionState", Val: hostState},
			{Name: "summary.runtime.connectionState", Val: hostState},
		})
		vms = append(vms, h.Vm...)
	})
	for _, ref := range vms {
		if vm, ok := simulator.Map.Get(ref).(*simulator.VirtualMachine); ok {
			setVMConnection(vm, vmState)
		}
	}
}

func setVMConnection(vm *simulator.VirtualMachine, state types.VirtualMachineConnectionState) {
	simulator.Map.WithLock(vm, func() {
		simulator.Map.Update(vm, []types.PropertyChange{
			{Name: "runtime.connectionState", Val: state},
			{Name: "summary.runtime.connectionState", Val: state},
		})
	})
}

func (f *faults) serveHostLoss(q url.Values) (interface{}, error) {
	vm, err := findVM(q)
	if err != nil {
		return nil, err
	}
	after, err := parseSeconds(q, "not_responding_after", 60, 0, 86400)
	if err != nil {
		return nil, err
	}
	mgmtOnly, err := parseFlag(q, "mgmt_only")
	if err != nil {
		return nil, err
	}
	host := vmHost(vm)
	f.mu.Lock()
	loss, already := f.lost[host]
	if !already {
		now := time.Now()
		loss = &hostLoss{host: host, since: now, notRespondingAt: now.Add(time.Duration(after * float64(time.Second))),
			mgmtOnly: mgmtOnly, over: make(chan struct{})}
		f.lost[host] = loss
	}
	f.mu.Unlock()
	if !already {
		f.log.Printf("host-loss at=%.6f vm=%s host=%s mgmt_only=%v not_responding_at=%.6f",
			epoch(loss.since), vm.Name, hostName(host), mgmtOnly, epoch(loss.notRespondingAt))
		if after == 0 {
			f.notResponding(loss)
		} else {
			go func() {
				select {
				case <-time.After(time.Until(loss.notRespondingAt)):
					f.notResponding(loss)
				case <-loss.over:
				}
			}()
		}
	}
	return map[string]interface{}{
		"vm": vm.Name, "host": hostName(host), "at": epoch(loss.since), "already_lost": already,
		"not_responding_at": epoch(loss.notRespondingAt), "mgmt_only": loss.mgmtOnly,
	}, nil
}

// notResponding is vCenter giving up on the host's heartbeat.
func (f *faults) notResponding(loss *hostLoss) {
	f.mu.Lock()
	defer f.mu.Unlock() // held so that a restore cannot interleave
	if f.lost[loss.host] != loss {
		return
	}
	setConnection(loss.host, types.HostSystemConnectionStateNotResponding,
		types.VirtualMachineConnectionStateDisconnected)
	f.log.Printf("host-not-responding at=%.6f host=%s", epoch(time.Now()), hostName(loss.host))
}

func (f *faults) serveHostRestore(q url.Values) (interface{}, error) {
	vm, err := findVM(q)
	if err != nil {
		return nil, err
	}
	ha, err := parseFlag(q, "ha")
	if err != nil {
		return nil, err
	}
	host := vmHost(vm)
	var target types.ManagedObjectReference
	if ha {
		if target, err = f.otherHost(vm, host); err != nil {
			return nil, err
		}
	}
	f.mu.Lock()
	loss := f.lost[host]
	if loss != nil {
		delete(f.lost, host)
		close(loss.over) // pending power tasks and guest calls fail now
		setConnection(host, types.HostSystemConnectionStateConnected, types.VirtualMachineConnectionStateConnected)
	}
	f.mu.Unlock()
	now := time.Now()
	out := map[string]interface{}{"vm": vm.Name, "host": hostName(host), "at": epoch(now), "was_lost": loss != nil,
		"ha": ha}
	line := fmt.Sprintf("host-restore at=%.6f vm=%s host=%s was_lost=%v", epoch(now), vm.Name, hostName(host), loss != nil)
	if ha {
		// vSphere HA: the VM is registered and powered on again on another host of the cluster.
		wasOn := false
		simulator.Map.WithLock(vm, func() { wasOn = vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn })
		f.moveVM(vm, host, target, wasOn)
		setVMConnection(vm, types.VirtualMachineConnectionStateConnected)
		out["ha_host"] = hostName(target)
		line += " ha_host=" + hostName(target)
		if wasOn {
			on := now.Add(2 * time.Second)
			out["powered_on_at"] = epoch(on)
			line += fmt.Sprintf(" powered_on_at=%.6f", epoch(on))
			go func() {
				time.Sleep(time.Until(on))
				setPower(vm, types.VirtualMachinePowerStatePoweredOn)
				f.log.Printf("ha-powered-on at=%.6f vm=%s host=%s", epoch(time.Now()), vm.Name, hostName(target))
			}()
		}
	}
	f.log.Print(line)
	return out, nil
}

// otherHost is where HA or vMotion takes the VM: the datacenter's spare host, or back to the
// VM's own host when it already sits on the spare.
func (f *faults) otherHost(vm *simulator.VirtualMachine, current types.ManagedObjectReference) (types.ManagedObjectReference, error) {
	dc := datacenterOf(vm.Self)
	f.mu.Lock()
	defer f.mu.Unlock()
	spare, ok := f.spare[dc]
	if !ok {
		return spare, &httpError{http.StatusConflict, "datacenter " + dc + " has no spare host"}
	}
	if current != spare {
		return spare, nil
	}
	if home, ok := f.home[vm.Self]; ok && home != spare {
		return home, nil
	}
	return spare, &httpError{http.StatusConflict, vm.Name + " is on the spare host and has no other host to go to"}
}

// moveVM re-registers the VM on another host (powered off first when powerOff is set).
func (f *faults) moveVM(vm *simulator.VirtualMachine, from, to types.ManagedObjectReference, powerOff bool) {
	f.mu.Lock()
	if _, ok := f.home[vm.Self]; !ok {
		f.home[vm.Self] = from
	}
	f.mu.Unlock()
	placeVM(vm, from, to, powerOff)
}

// placeVM moves the VM from one host's list to another's and points its runtime at the new one.
func placeVM(vm *simulator.VirtualMachine, from, to types.ManagedObjectReference, powerOff bool) {
	if h, ok := simulator.Map.Get(from).(*simulator.HostSystem); ok {
		simulator.Map.WithLock(h, func() {
			var kept []types.ManagedObjectReference
			for _, ref := range h.Vm {
				if ref != vm.Self {
					kept = append(kept, ref)
				}
			}
			simulator.Map.Update(h, []types.PropertyChange{{Name: "vm", Val: kept}})
		})
	}
	if h, ok := simulator.Map.Get(to).(*simulator.HostSystem); ok {
		simulator.Map.WithLock(h, func() {
			simulator.Map.Update(h, []types.PropertyChange{
				{Name: "vm", Val: append(append([]types.ManagedObjectReference(nil), h.Vm...), vm.Self)}})
		})
	}
	changes := []types.PropertyChange{
		{Name: "runtime.host", Val: to},
		{Name: "summary.runtime.host", Val: to},
	}
	if powerOff {
		changes = append(changes, powerChanges(types.VirtualMachinePowerStatePoweredOff)...)
	}
	simulator.Map.WithLock(vm, func() { simulator.Map.Update(vm, changes) })
}

func powerChanges(state types.VirtualMachinePowerState) []types.PropertyChange {
	var boot interface{}
	if state == types.VirtualMachinePowerStatePoweredOn {
		boot = time.Now()
	}
	return []types.PropertyChange{
		{Name: "runtime.powerState", Val: state},
		{Name: "summary.runtime.powerState", Val: state},
		{Name: "summary.runtime.bootTime", Val: boot},
	}
}

func setPower(vm *simulator.VirtualMachine, state types.VirtualMachinePowerState) {
	simulator.Map.WithLock(vm, func() { simulator.Map.Update(vm, powerChanges(state)) })
}

// addRecentTask lists a task in the VM's recentTask, as vCenter does (vcsim only keeps the
// TaskManager's list).
func addRecentTask(vm *simulator.VirtualMachine, task types.ManagedObjectReference) {
	simulator.Map.WithLock(vm, func() {
		recent := append(append([]types.ManagedObjectReference(nil), vm.RecentTask...), task)
		if len(recent) > 10 {
			recent = recent[len(recent)-10:]
		}
		simulator.Map.Update(vm, []types.PropertyChange{{Name: "recentTask", Val: recent}})
	})
}

func (f *faults) serveStunTask(q url.Values) (interface{}, error) {
	vm, err := findVM(q)
	if err != nil {
		return nil, err
	}
	kind := q.Get("task")
	if kind != "snapshot" && kind != "vmotion" {
		return nil, badRequest("task must be snapshot or vmotion, got %q", kind)
	}
	seconds, err := parseSeconds(q, "seconds", -1, 0, 3600)
	if err != nil {
		return nil, err
	}
	host := vmHost(vm)
	if f.lossOf(host) != nil {
		return nil, &httpError{http.StatusConflict, vm.Name + "'s host " + hostName(host) + " is lost"}
	}
	var target types.ManagedObjectReference
	method, name := "CreateSnapshot_Task", "createSnapshot"
	if kind == "vmotion" {
		method, name = "RelocateVM_Task", "relocate"
		if target, err = f.otherHost(vm, host); err != nil {
			return nil, err
		}
	}
	started := make(chan struct{})
	task := newTask(vm, method, name, func(t *simulator.Task) (types.AnyType, types.BaseMethodFault) {
		close(started)
		time.Sleep(time.Duration(seconds * float64(time.Second)))
		defer func() {
			f.log.Printf("stun-task-done at=%.6f vm=%s task=%s kind=%s", epoch(time.Now()), vm.Name, t.Self.Value, kind)
		}()
		if kind == "snapshot" {
			return f.snapshot(vm)
		}
		f.moveVM(vm, vmHost(vm), target, false)
		return nil, nil
	})
	go runTask(task)
	<-started // Run has marked it running and set its start time
	at := task.Info.StartTime
	if at == nil {
		now := time.Now()
		at = &now
	}
	out := map[string]interface{}{"vm": vm.Name, "task": task.Self.Value, "kind": kind, "at": epoch(*at),
		"seconds": seconds, "ends_at": epoch(at.Add(time.Duration(seconds * float64(time.Second))))}
	line := fmt.Sprintf("stun-task at=%.6f vm=%s task=%s kind=%s seconds=%g", epoch(*at), vm.Name, task.Self.Value, kind, seconds)
	if kind == "vmotion" {
		out["from_host"], out["to_host"] = hostName(host), hostName(target)
		line += " from_host=" + hostName(host) + " to_host=" + hostName(target)
	}
	f.log.Print(line)
	return out, nil
}

// snapshot takes the snapshot through the simulator's own CreateSnapshot_Task and hides the
// inner task it makes, so that the stun task is the only one vCenter shows.
func (f *faults) snapshot(vm *simulator.VirtualMachine) (types.AnyType, types.BaseMethodFault) {
	var body interface{}
	simulator.Map.WithLock(vm, func() {
		body = vm.CreateSnapshotTask(&types.CreateSnapshot_Task{This: vm.Self,
			Name: "drflow-stun-" + time.Now().UTC().Format("20060102T150405.000"), Description: "lab stun"})
	})
	res, ok := body.(*methods.CreateSnapshot_TaskBody)
	if !ok || res.Res == nil {
		return nil, &types.RuntimeFault{}
	}
	inner, ok := simulator.Map.Get(res.Res.Returnval).(*simulator.Task)
	if !ok {
		return nil, &types.RuntimeFault{}
	}
	if tm, ok := simulator.Map.Get(f.taskManager).(*simulator.TaskManager); ok {
		tm.Lock()
		var kept []types.ManagedObjectReference
		for _, ref := range tm.RecentTask {
			if ref != inner.Self {
				kept = append(kept, ref)
			}
		}
		simulator.Map.Update(tm, []types.PropertyChange{{Name: "recentTask", Val: kept}})
		tm.Unlock()
	}
	simulator.Map.Remove(inner.Self)
	if inner.Info.Error != nil {
		return nil, inner.Info.Error.Fault
	}
	return inner.Info.Result, nil
}

// newTask makes a task on the VM named as vCenter names it (vcsim's own say "PowerOff", which
// pyVmomi cannot map to a method) and lists it in the VM's recentTask.
func newTask(vm *simulator.VirtualMachine, method, id string,
	run func(*simulator.Task) (types.AnyType, types.BaseMethodFault)) *simulator.Task {
	task := simulator.CreateTask(vm, id, run)
	simulator.Map.WithLock(task, func() {
		task.Info.Name = method
		task.Info.EntityName = vm.Name
	})
	addRecentTask(vm, task.Self)
	return task
}

// runTask is simulator.Task.Run with vCenter's fault messages instead of Go type names.
func runTask(t *simulator.Task) {
	simulator.Map.Update(t, []types.PropertyChange{
		{Name: "info.startTime", Val: time.Now()},
		{Name: "info.state", Val: types.TaskInfoStateRunning},
	})
	res, err := t.Execute(t)
	state := types.TaskInfoStateSuccess
	var fault interface{}
	if err != nil {
		state = types.TaskInfoStateError
		fault = types.LocalizedMethodFault{Fault: err, LocalizedMessage: faultMessage(err)}
	}
	simulator.Map.Update(t, []types.PropertyChange{
		{Name: "info.completeTime", Val: time.Now()},
		{Name: "info.state", Val: state},
		{Name: "info.result", Val: res},
		{Name: "info.error", Val: fault},
	})
}

// faultMessage is what vCenter says with the fault.
func faultMessage(fault types.BaseMethodFault) string {
	switch fault.(type) {
	case *types.HostCommunication:
		return "An error occurred while communicating with the remote host."
	case *types.InvalidHostConnectionState:
		return "The operation is not allowed in the current connection state of the host."
	}
	return strings.TrimPrefix(fmt.Sprintf("%T", fault), "*types.")
}

// ---- the SOAP front: power operations on a VM whose host is lost -----------------------------

// SOAP method -> the task's descriptionId suffix, as vCenter names them.
var powerTasks = map[string]string{
	"PowerOffVM_Task": "powerOff", "PowerOnVM_Task": "powerOn", "ResetVM_Task": "reset",
	"SuspendVM_Task": "suspend",
}

var guestCalls = map[string]bool{"ShutdownGuest": true, "RebootGuest": true, "StandbyGuest": true}

func (f *faults) front(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && (r.URL.Path == "/sdk" || r.URL.Path == "/sdk/vimService") && f.anyLost() {
			body, err := ioutil.ReadAll(r.Body)
			_ = r.Body.Close()
			if err != nil {
				w.WriteHeader(http.StatusBadRequest)
				return
			}
			if f.intercept(w, r, body) {
				return
			}
			r.Body = ioutil.NopCloser(bytes.NewReader(body))
		}
		next.ServeHTTP(w, r)
	})
}

// sniff reads the SOAP method's name and its _this reference, nothing else.
func sniff(body []byte) (string, types.ManagedObjectReference, bool) {
	var none types.ManagedObjectReference
	d := xml.NewDecoder(bytes.NewReader(body))
	inBody, method := false, ""
	for {
		tok, err := d.Token()
		if err != nil {
			return "", none, false
		}
		se, ok := tok.(xml.StartElement)
		switch {
		case !ok:
		case !inBody:
			inBody = se.Name.Local == "Body"
		case method == "":
			method = se.Name.Local
		case se.Name.Local == "_this":
			var v struct {
				Type  string `xml:"type,attr"`
				Value string `xml:",chardata"`
			}
			if d.DecodeElement(&v, &se) != nil {
				return "", none, false
			}
			return method, types.ManagedObjectReference{Type: v.Type, Value: strings.TrimSpace(v.Value)}, true
		default:
			return "", none, false
		}
	}
}

// intercept answers a power operation on a VM of a lost host as vCenter does; false: not ours.
// The session is not checked here (vcsim would refuse an anonymous call): a lab shortcut.
func (f *faults) intercept(w http.ResponseWriter, r *http.Request, body []byte) bool {
	method, this, ok := sniff(body)
	if !ok || this.Type != "VirtualMachine" {
		return false
	}
	taskName, isTask := powerTasks[method]
	if !isTask && !guestCalls[method] {
		return false
	}
	vm, ok := simulator.Map.Get(this).(*simulator.VirtualMachine)
	if !ok {
		return false
	}
	host := vmHost(vm)
	loss := f.lossOf(host)
	if loss == nil {
		return false
	}
	gaveUp := func() types.BaseMethodFault {
		return &types.InvalidHostConnectionState{InvalidHostState: types.InvalidHostState{Host: &host}}
	}
	if isTask {
		// The task is accepted; it runs until vCenter declares the host lost, then fails.
		task := newTask(vm, method, taskName, func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
			if wait := time.Until(loss.notRespondingAt); wait > 0 {
				select {
				case <-time.After(wait):
				case <-loss.over:
				}
				return nil, &types.HostCommunication{}
			}
			return nil, gaveUp()
		})
		go runTask(task)
		f.log.Printf("power-op at=%.6f vm=%s method=%s task=%s host=%s: will fail", epoch(time.Now()), vm.Name,
			method, task.Self.Value, hostName(host))
		writeSOAP(w, http.StatusOK, fmt.Sprintf(`<%sResponse xmlns="urn:vim25"><returnval type="Task">%s</returnval></%sResponse>`,
			method, xmlText(task.Self.Value), method))
		return true
	}
	// A guest call is synchronous: it hangs until vCenter gives up on the host.
	f.log.Printf("power-op at=%.6f vm=%s method=%s host=%s: will fail", epoch(time.Now()), vm.Name, method, hostName(host))
	var fault types.BaseMethodFault = &types.HostCommunication{}
	if wait := time.Until(loss.notRespondingAt); wait > 0 {
		select {
		case <-time.After(wait):
		case <-loss.over:
		case <-r.Context().Done():
			return true
		}
	} else {
		fault = gaveUp()
	}
	writeFault(w, fault)
	return true
}

func xmlText(s string) string {
	var b bytes.Buffer
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}

func writeSOAP(w http.ResponseWriter, code int, body string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(code)
	_, _ = io.WriteString(w, xml.Header+`<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/"`+
		` xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema"`+
		` xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>`+body+`</soapenv:Body></soapenv:Envelope>`)
}

// writeFault encodes a vim fault as the simulator does (detail element "<Type>Fault").
func writeFault(w http.ResponseWriter, fault types.BaseMethodFault) {
	kind := strings.TrimPrefix(fmt.Sprintf("%T", fault), "*types.")
	var detail bytes.Buffer
	enc := vimxml.NewEncoder(&detail)
	start := vimxml.StartElement{Name: vimxml.Name{Local: kind + "Fault"}, Attr: []vimxml.Attr{
		{Name: vimxml.Name{Local: "xmlns"}, Value: "urn:vim25"},
		{Name: vimxml.Name{Local: "xsi:type"}, Value: kind},
	}}
	if err := enc.EncodeElement(fault, start); err == nil {
		_ = enc.Flush()
	}
	writeSOAP(w, http.StatusInternalServerError, `<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>`+
		xmlText(faultMessage(fault))+`</faultstring><detail>`+detail.String()+`</detail></soapenv:Fault>`)
}
