// Command vcsim-lab serves a vCenter simulator (govmomi 0.24 simulator package) with the drflow lab
// inventory: datacenters "prod" and "dr", one powered-on VM per protection group and site, and an
// isolated port group in "dr" for DR drills. It writes a JSON description of what it serves to -info
// once the inventory is ready, so the caller can wait for that file instead of polling the port.
// With -twins, each named VM is created in both datacenters under the very same name (a DR VM
// named like the VM it protects, as many shops do); with -tls, vCenter is served over HTTPS with
// a self-signed certificate, as a fresh vCenter is.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
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
	"syscall"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/simulator/esx"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

type vmInfo struct {
	Datacenter string `json:"datacenter"`
	EsxHost    string `json:"esx_host"`
}

type info struct {
	URL               string            `json:"url"`
	Host              string            `json:"host"`
	Port              int               `json:"port"`
	Pid               int               `json:"pid"`
	VMs               map[string]vmInfo `json:"vms"`
	IsolatedPortgroup string            `json:"isolated_portgroup"`
	IsolatedVswitch   string            `json:"isolated_vswitch"`
	Twins             []string          `json:"twins"`
}

// Model.Create names datacenters DC0, DC1, ... in order; we rename them to the lab's sites.
var sites = []string{"prod", "dr"}

func main() {
	port := flag.Int("port", 0, "TCP port on 127.0.0.1 (0: pick a free one)")
	groups := flag.String("groups", "", "comma-separated protection group names")
	infoPath := flag.String("info", "", "write the served inventory as JSON to this file when ready")
	isolated := flag.String("isolated-portgroup", "drflow-isolated", "isolated port group in dr")
	verbose := flag.Bool("verbose", false, "keep the property collector's per-call log lines")
	twins := flag.String("twins", "", "comma-separated VM names created in every datacenter alike")
	useTLS := flag.Bool("tls", false, "serve HTTPS with a self-signed certificate")
	flag.Parse()
	if !*verbose {
		// A power bridge long-polls WaitForUpdatesEx: vcsim would log each call, every second.
		log.SetOutput(quietWriter{os.Stderr})
	}

	if err := run(*port, splitGroups(*groups), splitGroups(*twins), *infoPath, *isolated, *useTLS); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim-lab:", err)
		os.Exit(1)
	}
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

func run(port int, groups, twins []string, infoPath, isolated string, useTLS bool) error {
	m := simulator.VPX()
	m.Datacenter = len(sites)
	m.Host = 1
	m.Cluster = 0
	m.ClusterHost = 0
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

	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	// vcsim panics on a busy port; say it in one line instead.
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	_ = l.Close()
	m.Service.TLS = nil
	if useTLS {
		m.Service.TLS = new(tls.Config) // the simulator then makes a self-signed certificate
	}
	m.Service.Listen = &url.URL{Host: addr}
	s := m.Service.NewServer()
	registerDisableMethodHook(m.Service)

	ctx := context.Background()
	c, err := govmomi.NewClient(ctx, s.URL, true) // insecure: our own self-signed certificate
	if err != nil {
		return fmt.Errorf("connect to own simulator: %w", err)
	}
	out := info{VMs: map[string]vmInfo{}, IsolatedPortgroup: isolated, Pid: os.Getpid(), Twins: twins}
	if err := buildInventory(ctx, c, groups, twins, isolated, &out); err != nil {
		return fmt.Errorf("inventory: %w", err)
	}
	_ = c.Logout(ctx)

	u := *s.URL
	u.User = nil
	out.URL = u.String()
	out.Host = u.Hostname()
	out.Port, _ = strconv.Atoi(u.Port())
	if infoPath != "" {
		if err := writeAtomic(infoPath, out); err != nil {
			return err
		}
	}
	fmt.Println(out.URL)
	select {} // serve until signalled
}

func buildInventory(ctx context.Context, c *govmomi.Client, groups, twins []string, isolated string, out *info) error {
	finder := find.NewFinder(c.Client, false)
	for i, site := range sites {
		dc, err := finder.Datacenter(ctx, fmt.Sprintf("DC%d", i))
		if err != nil {
			return err
		}
		if err := waitTask(dc.Common.Rename(ctx, site)); err != nil {
			return fmt.Errorf("rename datacenter to %s: %w", site, err)
		}
		finder.SetDatacenter(dc)
		host, err := finder.DefaultHostSystem(ctx)
		if err != nil {
			return err
		}
		hostName := "esx-" + site + "-01"
		renameHost(host, hostName)
		pool, err := host.ResourcePool(ctx)
		if err != nil {
			return err
		}
		folders, err := dc.Folders(ctx)
		if err != nil {
			return err
		}
		giveUplink(host)
		for _, g := range groups {
			name := g + "-" + site
			if err := createVM(ctx, c, folders.VmFolder, pool, host, name); err != nil {
				return fmt.Errorf("create VM %s: %w", name, err)
			}
			out.VMs[name] = vmInfo{Datacenter: site, EsxHost: hostName}
		}
		for _, name := range twins {
			if err := createVM(ctx, c, folders.VmFolder, pool, host, name); err != nil {
				return fmt.Errorf("create VM %s in %s: %w", name, site, err)
			}
		}
		if site == "dr" {
			vswitch, err := addIsolatedPortgroup(ctx, finder, host, isolated)
			if err != nil {
				return fmt.Errorf("isolated port group: %w", err)
			}
			out.IsolatedVswitch = vswitch
		}
	}
	return nil
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
	host *object.HostSystem, name string) error {
	// Same hardware as the simulator's default VMs: one disk, a CD-ROM and one NIC on "VM Network".
	config := types.VirtualMachineConfigSpec{
		Name:    name,
		GuestId: string(types.VirtualMachineGuestOsIdentifierOtherGuest),
		Files:   &types.VirtualMachineFileInfo{VmPathName: "[LocalDS_0]"},
	}
	var devices object.VirtualDeviceList
	scsi, err := devices.CreateSCSIController("pvscsi")
	if err != nil {
		return err
	}
	ide, err := devices.CreateIDEController()
	if err != nil {
		return err
	}
	cdrom, err := devices.CreateCdrom(ide.(*types.VirtualIDEController))
	if err != nil {
		return err
	}
	disk := devices.CreateDisk(scsi.(types.BaseVirtualController), types.ManagedObjectReference{},
		config.Files.VmPathName+" "+path.Join(name, "disk1.vmdk"))
	disk.CapacityInKB = 1024
	nic := esx.EthernetCard
	backing := *nic.Backing.(*types.VirtualEthernetCardNetworkBackingInfo)
	nic.Backing = &backing
	devices = append(devices, scsi, cdrom, disk, &nic)
	if config.DeviceChange, err = devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd); err != nil {
		return err
	}
	task, err := folder.CreateVM(ctx, config, pool, host)
	if err != nil {
		return err
	}
	res, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return err
	}
	vm := object.NewVirtualMachine(c.Client, res.Result.(types.ManagedObjectReference))
	return waitTask(vm.PowerOn(ctx))
}

// addIsolatedPortgroup adds a vSwitch without any physical NIC and a port group on it: a VM
// attached there can talk to other VMs on the same switch and nothing else.
func addIsolatedPortgroup(ctx context.Context, finder *find.Finder, host *object.HostSystem,
	pgName string) (string, error) {
	const vswitch = "vSwitch-drflow-isolated"
	ns, err := host.ConfigManager().NetworkSystem(ctx)
	if err != nil {
		return "", err
	}
	spec := types.HostVirtualSwitchSpec{NumPorts: 128} // no Bridge: no uplink
	if err := ns.AddVirtualSwitch(ctx, vswitch, &spec); err != nil {
		return "", err
	}
	pg := types.HostPortGroupSpec{Name: pgName, VswitchName: vswitch, Policy: types.HostNetworkPolicy{}}
	if err := ns.AddPortGroup(ctx, pg); err != nil {
		return "", err
	}
	// vcsim 0.24 records only the name of an added switch; fill in what a real host reports.
	sim := simulator.Map.Get(ns.Reference()).(*simulator.HostNetworkSystem)
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
	net, err := finder.Network(ctx, pgName)
	if err != nil {
		return "", err
	}
	h := simulator.Map.Get(host.Reference()).(*simulator.HostSystem)
	simulator.Map.Update(h, []types.PropertyChange{
		{Name: "network", Val: append(append([]types.ManagedObjectReference(nil), h.Network...), net.Reference())},
	})
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
