package main

// Guest operations (GuestOperationsManager's file and process managers) for the lab's VMs, which
// vcsim 0.24 offers only for VMs backed by docker containers. A lab VM is a network namespace
// (its address, its site) plus a few private directories: a program started in it runs in that
// namespace, in a mount namespace of its own where the VM's directories (`dirs`, e.g.
// /opt/drflow) are bind-mounted from the VM's root in the lab directory, so two VMs' files never
// meet. File transfers read and write those directories; any other guest path is refused, as a
// guest user without the right to it would be. Who may log in, and where each VM lives, comes
// from the -guests file (re-read at every call: the lab writes it after the launcher starts).
// What vCenter does for real and is kept here: no guest operation on a VM that is off or whose
// host is lost (GuestOperationsUnavailable: VMware Tools is not running), InvalidGuestLogin for
// bad credentials, a transfer URL with "*" for the host (the client substitutes the address it
// reached vCenter at), programs run through the guest's shell, exited programs listed with their
// exit code for a while, and every program of a VM killed when the VM powers off.

import (
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const guestTransferPath = "/drflow/guestFile"

// guestVM is one VM of the -guests file.
type guestVM struct {
	Prefix   []string `json:"prefix"` // argv entering the VM's network namespace
	Root     string   `json:"root"`   // the VM's private directories live under here
	Dirs     []string `json:"dirs"`   // guest directories that are the VM's own
	User     string   `json:"user"`
	Password string   `json:"password"`
}

type guestProc struct {
	info types.GuestProcessInfo
	vm   types.ManagedObjectReference
}

// powerOf is whether the VM is on, and when it last booted.
func powerOf(vm *simulator.VirtualMachine) (on bool, boot time.Time) {
	simulator.Map.WithLock(vm, func() {
		on = vm.Runtime.PowerState == types.VirtualMachinePowerStatePoweredOn
		if vm.Summary.Runtime.BootTime != nil {
			boot = *vm.Summary.Runtime.BootTime
		}
	})
	return on, boot
}

type guestLab struct {
	path string // the -guests file
	mu   sync.Mutex
	// transfers: one-shot tokens → (VM, guest path, host path, upload?)
	transfers map[string]transfer
	procs     map[int64]*guestProc
	seq       int64
	booted    map[string]time.Time // VM → the boot whose units were started
	seenBoot  map[string]time.Time // VM → its boot when last seen on
}

type transfer struct {
	host    string
	upload  bool
	mode    os.FileMode
	expires time.Time
}

const transferTTL = 10 * time.Minute

func newGuestLab(path string) *guestLab {
	return &guestLab{path: path, transfers: map[string]transfer{}, procs: map[int64]*guestProc{},
		booted: map[string]time.Time{}, seenBoot: map[string]time.Time{}}
}

func (g *guestLab) load() (map[string]guestVM, error) {
	if g.path == "" {
		return map[string]guestVM{}, nil
	}
	raw, err := os.ReadFile(g.path)
	if os.IsNotExist(err) {
		return map[string]guestVM{}, nil
	}
	if err != nil {
		return nil, err
	}
	out := map[string]guestVM{}
	if err := json.Unmarshal(raw, &out); err != nil {
		return nil, fmt.Errorf("%s: %w", g.path, err)
	}
	return out, nil
}

// guest finds the VM's entry and checks that guest operations can run and the login is good.
// The fault is a Fault body's payload; callers wrap it in their own response type.
func (g *guestLab) guest(ctx *simulator.Context, ref types.ManagedObjectReference,
	auth types.BaseGuestAuthentication) (*simulator.VirtualMachine, guestVM, *soap.Fault) {
	obj := ctx.Map.Get(ref)
	vm, ok := obj.(*simulator.VirtualMachine)
	if !ok {
		return nil, guestVM{}, simulator.Fault("", &types.ManagedObjectNotFound{Obj: ref})
	}
	var state types.VirtualMachinePowerState
	var conn types.VirtualMachineConnectionState
	ctx.Map.WithLock(vm, func() {
		state, conn = vm.Runtime.PowerState, vm.Runtime.ConnectionState
	})
	if state != types.VirtualMachinePowerStatePoweredOn || conn != types.VirtualMachineConnectionStateConnected {
		return nil, guestVM{}, simulator.Fault(fmt.Sprintf(
			"guest operations on %s are unavailable: VMware Tools is not running (%s, %s)",
			vm.Name, state, conn), &types.GuestOperationsUnavailable{})
	}
	vms, err := g.load()
	if err != nil {
		return nil, guestVM{}, simulator.Fault(err.Error(), &types.SystemError{Reason: err.Error()})
	}
	entry, ok := vms[vm.Name]
	if !ok {
		return nil, guestVM{}, simulator.Fault(fmt.Sprintf(
			"guest operations on %s are unavailable: VMware Tools is not installed", vm.Name),
			&types.GuestOperationsUnavailable{})
	}
	// Tools answers once the guest has booted (its enabled units started), not before.
	_, boot := powerOf(vm)
	g.mu.Lock()
	booted := g.booted[vm.Name]
	g.mu.Unlock()
	if !booted.Equal(boot) {
		return nil, guestVM{}, simulator.Fault(fmt.Sprintf(
			"guest operations on %s are unavailable: VMware Tools is not running yet (booting)",
			vm.Name), &types.GuestOperationsUnavailable{})
	}
	login, ok := auth.(*types.NamePasswordAuthentication)
	if !ok || login.Username != entry.User || login.Password != entry.Password {
		return nil, guestVM{}, simulator.Fault("Failed to authenticate with the guest operating system "+
			"using the supplied credentials.", &types.InvalidGuestLogin{})
	}
	return vm, entry, nil
}

// hostPath maps a guest path into the VM's own directories, or refuses it.
func hostPath(entry guestVM, guestPath string) (string, *soap.Fault) {
	clean := filepath.Clean(guestPath)
	if !filepath.IsAbs(clean) {
		return "", simulator.Fault("guest path must be absolute: "+guestPath,
			&types.InvalidArgument{InvalidProperty: "guestFilePath"})
	}
	for _, d := range entry.Dirs {
		if clean == d || strings.HasPrefix(clean, strings.TrimSuffix(d, "/")+"/") {
			return filepath.Join(entry.Root, clean), nil
		}
	}
	return "", simulator.Fault(fmt.Sprintf("permission denied: %s (the guest user may write only "+
		"under %s)", guestPath, strings.Join(entry.Dirs, ", ")), &types.GuestPermissionDenied{})
}

// resolve is guest() and hostPath() together: the host path of a guest path in a VM that takes
// guest operations from this login.
func (g *guestLab) resolve(ctx *simulator.Context, ref types.ManagedObjectReference,
	auth types.BaseGuestAuthentication, guestPath string) (string, *soap.Fault) {
	_, entry, fault := g.guest(ctx, ref, auth)
	if fault != nil {
		return "", fault
	}
	return hostPath(entry, guestPath)
}

func (g *guestLab) token(t transfer) string {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.seq++
	tok := fmt.Sprintf("%d-%d", time.Now().UnixNano(), g.seq)
	g.transfers[tok] = t
	return tok
}

func transferURL(tok string) string {
	scheme := "http"
	if simulatorTLS {
		scheme = "https"
	}
	// "*": the client puts in the address it reached vCenter at (as for a real ESXi host).
	return (&url.URL{Scheme: scheme, Host: "*", Path: guestTransferPath,
		RawQuery: url.Values{"token": []string{tok}}.Encode()}).String()
}

var simulatorTLS bool

// ---- the file manager ----------------------------------------------------------------------

type guestFiles struct {
	mo.GuestFileManager
	lab *guestLab
}

func fileFault(msg, file string, fault types.BaseMethodFault) *soap.Fault {
	return simulator.Fault(msg+": "+file, fault)
}

func (m *guestFiles) InitiateFileTransferToGuest(ctx *simulator.Context,
	req *types.InitiateFileTransferToGuest) soap.HasFault {
	body := new(methods.InitiateFileTransferToGuestBody)
	p, fault := m.lab.resolve(ctx, req.Vm, req.Auth, req.GuestFilePath)
	if _, err := os.Stat(p); fault == nil && err == nil && !req.Overwrite {
		fault = fileFault("file exists", req.GuestFilePath,
			&types.FileAlreadyExists{FileFault: types.FileFault{File: req.GuestFilePath}})
	}
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	mode := os.FileMode(0o644)
	if a, ok := req.FileAttributes.(*types.GuestPosixFileAttributes); ok && a.Permissions != 0 {
		mode = os.FileMode(a.Permissions) & os.ModePerm
	}
	tok := m.lab.token(transfer{host: p, upload: true, mode: mode, expires: time.Now().Add(transferTTL)})
	body.Res = &types.InitiateFileTransferToGuestResponse{Returnval: transferURL(tok)}
	return body
}

func (m *guestFiles) InitiateFileTransferFromGuest(ctx *simulator.Context,
	req *types.InitiateFileTransferFromGuest) soap.HasFault {
	body := new(methods.InitiateFileTransferFromGuestBody)
	p, fault := m.lab.resolve(ctx, req.Vm, req.Auth, req.GuestFilePath)
	st, err := os.Stat(p)
	if fault == nil && (err != nil || st.IsDir()) {
		fault = fileFault("file not found", req.GuestFilePath,
			&types.FileNotFound{FileFault: types.FileFault{File: req.GuestFilePath}})
	}
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	tok := m.lab.token(transfer{host: p, expires: time.Now().Add(transferTTL)})
	body.Res = &types.InitiateFileTransferFromGuestResponse{
		Returnval: types.FileTransferInformation{Size: st.Size(), Url: transferURL(tok),
			Attributes: &types.GuestPosixFileAttributes{Permissions: int64(st.Mode().Perm()),
				GuestFileAttributes: types.GuestFileAttributes{ModificationTime: types.NewTime(st.ModTime())}}}}
	return body
}

func (m *guestFiles) MakeDirectoryInGuest(ctx *simulator.Context, req *types.MakeDirectoryInGuest) soap.HasFault {
	body := new(methods.MakeDirectoryInGuestBody)
	p, fault := m.lab.resolve(ctx, req.Vm, req.Auth, req.DirectoryPath)
	if fault == nil {
		var err error
		if req.CreateParentDirectories {
			err = os.MkdirAll(p, 0o755)
		} else {
			err = os.Mkdir(p, 0o755)
		}
		if err != nil {
			fault = fileFault(err.Error(), req.DirectoryPath,
				&types.FileAlreadyExists{FileFault: types.FileFault{File: req.DirectoryPath}})
		}
	}
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	body.Res = &types.MakeDirectoryInGuestResponse{}
	return body
}

func (m *guestFiles) DeleteFileInGuest(ctx *simulator.Context, req *types.DeleteFileInGuest) soap.HasFault {
	body := new(methods.DeleteFileInGuestBody)
	p, fault := m.lab.resolve(ctx, req.Vm, req.Auth, req.FilePath)
	if fault == nil && os.Remove(p) != nil {
		fault = fileFault("file not found", req.FilePath,
			&types.FileNotFound{FileFault: types.FileFault{File: req.FilePath}})
	}
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	body.Res = &types.DeleteFileInGuestResponse{}
	return body
}

// serveTransfer is the URL a transfer hands out: PUT writes the file, GET reads it; once each.
func (g *guestLab) serveTransfer(w http.ResponseWriter, r *http.Request) {
	tok := r.URL.Query().Get("token")
	g.mu.Lock()
	t, ok := g.transfers[tok]
	delete(g.transfers, tok)
	g.mu.Unlock()
	if !ok || time.Now().After(t.expires) {
		http.Error(w, "unknown or expired transfer", http.StatusNotFound)
		return
	}
	switch {
	case t.upload && r.Method == http.MethodPut:
		if err := os.MkdirAll(filepath.Dir(t.host), 0o755); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		tmp, err := os.CreateTemp(filepath.Dir(t.host), ".upload-")
		if err == nil {
			_, err = io.Copy(tmp, r.Body)
			if cerr := tmp.Close(); err == nil {
				err = cerr
			}
			if err == nil {
				err = os.Chmod(tmp.Name(), t.mode)
			}
			if err == nil {
				err = os.Rename(tmp.Name(), t.host)
			}
			if err != nil {
				_ = os.Remove(tmp.Name())
			}
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusOK)
	case !t.upload && r.Method == http.MethodGet:
		http.ServeFile(w, r, t.host)
	default:
		http.Error(w, "wrong method for this transfer", http.StatusMethodNotAllowed)
	}
}

// ---- the process manager -------------------------------------------------------------------

type guestProcesses struct {
	mo.GuestProcessManager
	lab *guestLab
}

// shellQuote quotes s for /bin/sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func (m *guestProcesses) StartProgramInGuest(ctx *simulator.Context, req *types.StartProgramInGuest) soap.HasFault {
	body := new(methods.StartProgramInGuestBody)
	vm, entry, fault := m.lab.guest(ctx, req.Vm, req.Auth)
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	spec := req.Spec.GetGuestProgramSpec()
	if !filepath.IsAbs(spec.ProgramPath) {
		body.Fault_ = simulator.Fault("programPath must be absolute: "+spec.ProgramPath,
			&types.InvalidArgument{InvalidProperty: "programPath"})
		return body
	}
	// Tools discards a program's output; the lab keeps it for whoever debugs a test.
	pid, err := m.lab.start(vm, entry, shellQuote(spec.ProgramPath)+" "+spec.Arguments,
		spec.WorkingDirectory, spec.EnvVariables, filepath.Join(entry.Root, "journal", "programs.log"))
	if err != nil {
		body.Fault_ = simulator.Fault(err.Error(), &types.FileNotFound{
			FileFault: types.FileFault{File: spec.ProgramPath}})
		return body
	}
	body.Res = &types.StartProgramInGuestResponse{Returnval: pid}
	return body
}

// start runs a shell command line in the VM: in its network namespace, with its directories
// bind-mounted over the guest paths in a mount namespace of the program's own. Its output goes
// to logPath ("" for none).
func (g *guestLab) start(vm *simulator.VirtualMachine, entry guestVM, command, cwd string,
	env []string, logPath string) (int64, error) {
	var mounts []string
	for _, d := range entry.Dirs {
		src := filepath.Join(entry.Root, d)
		if err := os.MkdirAll(src, 0o755); err != nil {
			return 0, err
		}
		if err := os.MkdirAll(d, 0o755); err != nil {
			return 0, err
		}
		mounts = append(mounts, fmt.Sprintf("mount --bind %s %s", shellQuote(src), shellQuote(d)))
	}
	script := strings.Join(append(mounts, "exec /bin/sh -c "+shellQuote(command)), " && ")
	argv := append(append([]string{}, entry.Prefix...),
		"unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = "/"
	if cwd != "" {
		cmd.Dir = cwd
		if p, f := hostPath(entry, cwd); f == nil {
			cmd.Dir = p // the namespace's mounts do not exist yet for the chdir
		}
	}
	cmd.Env = append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, env...)
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return 0, err
	}
	out := devnull
	if logPath != "" {
		if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
			return 0, err
		}
		if out, err = os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644); err != nil {
			return 0, err
		}
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		_ = devnull.Close()
		_ = out.Close()
		return 0, err
	}
	pid := int64(cmd.Process.Pid)
	name := strings.Trim(strings.Fields(command + " x")[0], "'")
	p := &guestProc{vm: vm.Self, info: types.GuestProcessInfo{
		Name: filepath.Base(name), Pid: pid, Owner: entry.User,
		CmdLine: strings.TrimSpace(strings.Replace(command, shellQuote(name), name, 1)), StartTime: time.Now()}}
	g.mu.Lock()
	g.procs[pid] = p
	g.mu.Unlock()
	go func() {
		err := cmd.Wait()
		_ = devnull.Close()
		_ = out.Close()
		code := int32(0)
		if ee, ok := err.(*exec.ExitError); ok {
			code = int32(ee.ExitCode())
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				code = int32(128 + ws.Signal())
			}
		}
		end := time.Now()
		g.mu.Lock()
		p.info.EndTime, p.info.ExitCode = &end, code
		g.mu.Unlock()
		log.Printf("drflow-guest: %s: program %d (%s) ended with %d", vm.Name, pid, p.info.Name, code)
	}()
	log.Printf("drflow-guest: %s: started program %d: %s", vm.Name, pid, p.info.CmdLine)
	return pid, nil
}

func (m *guestProcesses) ListProcessesInGuest(ctx *simulator.Context, req *types.ListProcessesInGuest) soap.HasFault {
	body := new(methods.ListProcessesInGuestBody)
	vm, _, fault := m.lab.guest(ctx, req.Vm, req.Auth)
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	want := map[int64]bool{}
	for _, pid := range req.Pids {
		want[pid] = true
	}
	var out []types.GuestProcessInfo
	m.lab.mu.Lock()
	for pid, p := range m.lab.procs {
		if p.vm == vm.Self && (len(want) == 0 || want[pid]) {
			out = append(out, p.info)
		}
	}
	m.lab.mu.Unlock()
	body.Res = &types.ListProcessesInGuestResponse{Returnval: out}
	return body
}

func (m *guestProcesses) TerminateProcessInGuest(ctx *simulator.Context, req *types.TerminateProcessInGuest) soap.HasFault {
	body := new(methods.TerminateProcessInGuestBody)
	vm, _, fault := m.lab.guest(ctx, req.Vm, req.Auth)
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	m.lab.mu.Lock()
	p, ok := m.lab.procs[req.Pid]
	m.lab.mu.Unlock()
	if !ok || p.vm != vm.Self {
		body.Fault_ = simulator.Fault("no such process: "+strconv.FormatInt(req.Pid, 10),
			&types.GuestProcessNotFound{Pid: req.Pid})
		return body
	}
	_ = syscall.Kill(-int(req.Pid), syscall.SIGKILL)
	body.Res = &types.TerminateProcessInGuestResponse{}
	return body
}

// boot does at a VM's power-on what its systemd would: every unit enabled in the VM's
// /etc/systemd/system/multi-user.target.wants (a unit file, or a link to one) has its
// ExecStart= lines run, with its Environment= and WorkingDirectory=, output appended to
// <root>/journal/<unit>.log. The lab's own VMs, on before the launcher first looks, are left
// alone (their services are the power bridge's); a VM cabled later boots once it has an entry.
func (g *guestLab) boot(vms []labVM, first bool) {
	for _, v := range vms {
		vm, name, on, boot, entry, known := v.vm, v.name, v.on, v.boot, v.entry, v.known
		g.mu.Lock()
		last, done := g.booted[name]
		if !on || !known {
			delete(g.booted, name)
		}
		g.mu.Unlock()
		if (!on || !known) && done {
			setToolsReady(vm, false)
		}
		if !on || !known || (done && last.Equal(boot)) {
			continue
		}
		if done {
			setToolsReady(vm, false) // rebooted: Tools is down until this boot is through
		}
		if !first {
			g.startUnits(vm, entry)
		}
		g.mu.Lock()
		g.booted[name] = boot // Tools answers from here
		g.mu.Unlock()
		setToolsReady(vm, true)
	}
}

// setToolsReady is what vCenter shows of Tools in a guest: running and taking guest operations
// only once the guest has booted. A client waits for guest.guestOperationsReady, not for the
// address customization reports at power-on.
func setToolsReady(vm *simulator.VirtualMachine, ready bool) {
	status := types.VirtualMachineToolsRunningStatusGuestToolsNotRunning
	if ready {
		status = types.VirtualMachineToolsRunningStatusGuestToolsRunning
	}
	simulator.Map.WithLock(vm, func() {
		// The whole GuestInfo at once: govmomi cannot apply a change to one *bool field of it.
		guest := types.GuestInfo{}
		if vm.Guest != nil {
			guest = *vm.Guest
		}
		guest.ToolsRunningStatus = string(status)
		guest.GuestOperationsReady = types.NewBool(ready)
		simulator.Map.Update(vm, []types.PropertyChange{{Name: "guest", Val: &guest}})
	})
}

func (g *guestLab) startUnits(vm *simulator.VirtualMachine, entry guestVM) {
	wants := filepath.Join(entry.Root, "/etc/systemd/system/multi-user.target.wants")
	links, _ := os.ReadDir(wants)
	for _, l := range links {
		if !strings.HasSuffix(l.Name(), ".service") {
			continue
		}
		unit := filepath.Join(wants, l.Name())
		if target, err := os.Readlink(unit); err == nil {
			if !filepath.IsAbs(target) {
				target = filepath.Join("/etc/systemd/system/multi-user.target.wants", target)
			}
			p, fault := hostPath(entry, target)
			if fault != nil {
				log.Printf("drflow-guest: %s: unit %s links outside the VM (%s): not started", vm.Name, l.Name(), target)
				continue
			}
			unit = p
		}
		raw, err := os.ReadFile(unit)
		if err != nil {
			log.Printf("drflow-guest: %s: unit %s: %v", vm.Name, l.Name(), err)
			continue
		}
		var execs, env []string
		cwd := ""
		for _, line := range strings.Split(string(raw), "\n") {
			line = strings.TrimSpace(line)
			switch {
			case strings.HasPrefix(line, "ExecStart="):
				execs = append(execs, strings.TrimLeft(strings.TrimPrefix(line, "ExecStart="), "-@+!"))
			case strings.HasPrefix(line, "Environment="):
				env = append(env, strings.Fields(strings.ReplaceAll(strings.TrimPrefix(line, "Environment="), `"`, ""))...)
			case strings.HasPrefix(line, "WorkingDirectory="):
				cwd = strings.TrimPrefix(line, "WorkingDirectory=")
			}
		}
		journal := filepath.Join(entry.Root, "journal", strings.TrimSuffix(l.Name(), ".service")+".log")
		for _, command := range execs {
			if _, err := g.start(vm, entry, command, cwd, env, journal); err != nil {
				log.Printf("drflow-guest: %s: unit %s did not start: %v", vm.Name, l.Name(), err)
			} else {
				log.Printf("drflow-guest: %s: booted unit %s", vm.Name, l.Name())
			}
		}
	}
}

// reap kills whatever runs in a VM that is off, and whatever started in it before its last
// power-on (a power cycle, however short): nothing outlives its VM's power, be it a program
// started through guest operations, one it left behind, or a service. Runs before boot in each
// tick, so the units boot starts are not taken for leftovers. Exited programs are forgotten
// after 5 minutes.
func (g *guestLab) reap() {
	first := true
	for range time.Tick(200 * time.Millisecond) {
		vms := g.vms() // one read of the -guests file and the inventory per tick
		g.killLeftovers(vms)
		g.boot(vms, first)
		first = false
		g.mu.Lock()
		for pid, p := range g.procs {
			if p.info.EndTime != nil && time.Since(*p.info.EndTime) > 5*time.Minute {
				delete(g.procs, pid)
			}
		}
		g.mu.Unlock()
	}
}

// labVM is one VM of the simulator as the lab sees it at one tick.
type labVM struct {
	vm    *simulator.VirtualMachine
	name  string
	on    bool
	boot  time.Time
	entry guestVM
	known bool // in the -guests file
}

func (g *guestLab) vms() []labVM {
	entries, err := g.load()
	if err != nil {
		return nil
	}
	var out []labVM
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm, ok := e.(*simulator.VirtualMachine)
		if !ok {
			continue
		}
		v := labVM{vm: vm}
		simulator.Map.WithLock(vm, func() { v.name = vm.Name })
		v.on, v.boot = powerOf(vm)
		v.entry, v.known = entries[v.name]
		out = append(out, v)
	}
	return out
}

func (g *guestLab) killLeftovers(vms []labVM) {
	var byNS map[nsID][]nsProc
	for _, v := range vms {
		name, entry, on, boot := v.name, v.entry, v.on, v.boot
		if !v.known || len(entry.Prefix) == 0 {
			continue
		}
		ns, ok := netnsID("/run/netns/" + entry.Prefix[len(entry.Prefix)-1])
		if !ok {
			continue
		}
		// A boot seen before is not news; one seen for the first time is news only if an
		// earlier one of the VM was seen (the lab starts its VMs' processes while the launcher
		// creates the VMs: those are no leftovers).
		last, seen := g.seenBoot[name]
		g.seenBoot[name] = boot
		if !on {
			delete(g.seenBoot, name)
		}
		if on && (!seen || last.Equal(boot)) {
			continue
		}
		if byNS == nil {
			byNS = processesByNetns() // only when a VM went off or rebooted
		}
		for _, p := range byNS[ns] {
			// Clock ticks are 10 ms: a process started right at power-on is not a leftover.
			if !on || p.start.Before(boot.Add(-20*time.Millisecond)) {
				if syscall.Kill(p.pid, syscall.SIGKILL) == nil {
					log.Printf("drflow-guest: %s: killed pid %d (the VM's power went)", name, p.pid)
				}
			}
		}
	}
}

type nsID struct{ dev, ino uint64 }

type nsProc struct {
	pid   int
	start time.Time
}

func netnsID(path string) (nsID, bool) {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil {
		return nsID{}, false
	}
	return nsID{uint64(st.Dev), st.Ino}, true
}

// processesByNetns lists every process with its network namespace and start time.
func processesByNetns() map[nsID][]nsProc {
	out := map[nsID][]nsProc{}
	btime := bootTime()
	entries, err := os.ReadDir("/proc")
	if err != nil || btime.IsZero() {
		return out
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		ns, ok := netnsID("/proc/" + e.Name() + "/ns/net")
		if !ok {
			continue // gone, or a zombie: it holds no namespace
		}
		raw, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		fields := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+1:]))
		if len(fields) < 20 {
			continue
		}
		ticks, err := strconv.ParseInt(fields[19], 10, 64) // starttime, field 22 of stat
		if err != nil {
			continue
		}
		start := btime.Add(time.Duration(ticks) * 10 * time.Millisecond) // USER_HZ = 100
		out[ns] = append(out[ns], nsProc{pid, start})
	}
	return out
}

// bootTime is when the machine booted, to 10 ms (/proc/stat's btime is whole seconds).
func bootTime() time.Time {
	raw, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return time.Time{}
	}
	fields := strings.Fields(string(raw))
	if len(fields) == 0 {
		return time.Time{}
	}
	up, err := strconv.ParseFloat(fields[0], 64)
	if err != nil {
		return time.Time{}
	}
	return time.Now().Add(-time.Duration(up * float64(time.Second)))
}

// registerGuestOperations replaces vcsim's guest file and process managers with the lab's.
func registerGuestOperations(svc *simulator.Service, path string, useTLS bool) {
	simulatorTLS = useTLS
	g := newGuestLab(path)
	// The references vcsim gives its own managers (GuestOperationsManager.init).
	files := types.ManagedObjectReference{Type: "GuestFileManager", Value: "guestOperationsFileManager"}
	procs := types.ManagedObjectReference{Type: "GuestProcessManager", Value: "guestOperationsProcessManager"}
	simulator.Map.Put(&guestFiles{GuestFileManager: mo.GuestFileManager{Self: files}, lab: g})
	simulator.Map.Put(&guestProcesses{GuestProcessManager: mo.GuestProcessManager{Self: procs}, lab: g})
	svc.Handle(guestTransferPath, http.HandlerFunc(g.serveTransfer))
	go g.reap()
}
