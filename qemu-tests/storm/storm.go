// Package storm is the fleet storm of issue 12: QEMU VMs booting at once
// (each with its own disk, host id and token) and synthetic hosts (the boot
// client, unlock/keys, in this process, each from its own loopback
// address), all enrolled in one etcd store, against several
// unlockrd-keyserver replicas (`serve --store etcd`, as the README's
// "Several replicas on etcd" says) on a 3-member etcd, while an
// unauthenticated client runs the attacks of qemu-tests/abuse at the
// replicas that stay up. Mid-storm one replica and the etcd leader are
// killed (SIGKILL).
//
// The storm runs in two waves. The first half of the synthetic hosts
// starts with the VMs. When the first VM's init prints its first line
// (before any VM asks for its key), the second half starts and, at once,
// the first replica (first in every VM's key URLs) and the etcd leader are
// killed: the VMs and the second wave must fail over to the replicas left,
// which must carry on over the etcd members left.
//
// Run returns what happened; Result.Problems says what went wrong. The
// test (qemu-tests, short form) and the bench (`-only storm`, full form)
// both run it.
package storm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog"
	"github.com/unlockrd/unlockrd/qemu-tests/abuse"
	"github.com/unlockrd/unlockrd/qemu-tests/harness"
	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/etcdstore"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/etcdstore/etcdtest"
	"github.com/unlockrd/unlockrd/unlock/keys"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

// Config sizes a storm.
type Config struct {
	// Dir holds everything the storm makes (disks, images, data folders,
	// console logs); the caller removes it.
	Dir string
	// VMs and Synthetic are how many hosts of each kind boot.
	VMs, Synthetic int
	// Replicas is the number of key server replicas (at least 2, since
	// one is killed); default 3.
	Replicas int
	// AttackEach is how long each attack runs before the next one takes
	// over; the attacks go round until every host has its key (or gave
	// up). Default 5 s.
	AttackEach time.Duration
	// VMMemoryMB is each VM's memory; default 320.
	VMMemoryMB int
	// BootTimeout bounds each VM's boot to the real init's report, and
	// each synthetic host's fetch; default 15 minutes (4 TCG guests on 2
	// shared cores are slow).
	BootTimeout time.Duration
	// Log receives console lines and progress, ServerLog the replicas'
	// output (an audit line per request: hundreds of thousands under
	// attack); nil discards them.
	Log, ServerLog io.Writer
}

// MaxPeakRSS bounds each surviving replica's peak resident memory, as the
// abuse suite does for one server.
const MaxPeakRSS = 128 << 20

// VMResult is one VM's boot.
type VMResult struct {
	Name, Host string
	// KeyAt is when the key line came, since QEMU started; KeyStage the
	// key stage's own duration, as the line gives it.
	KeyAt, KeyStage time.Duration
	Server          string // the replica that answered, as the guest saw it
	// FailedOver: the console shows a failed attempt at the killed
	// replica before the key came from another.
	FailedOver   bool
	SwitchRootAt time.Duration
	Err          error // nil: booted to the real init with data unlocked
}

// Result is what a storm did.
type Result struct {
	Cfg     Config
	Elapsed time.Duration
	VMs     []VMResult
	// Synthetic hosts: how many got the right key, their fetch times,
	// and the errors of those that did not.
	SyntheticOK  int
	SyntheticLat []time.Duration
	SyntheticErr []string
	// At the kills: how many synthetic hosts had their key and which
	// VMs had theirs (none should: the kills come first).
	KillAt             time.Duration
	ServedBeforeKill   int
	VMKeysBeforeKill   int
	KilledReplica      string
	KilledEtcd         string
	Attacks            []string // attack@replica, in order
	AttackAttempts     int64
	ReplicaPeakRSS     map[string]int64 // survivors
	Lost               []string         // hosts missing from the store or with another key afterwards
	Leaks              []string         // tokens found in a replica's output
	Enrolled, Replicas int
}

// host is one enrolled host.
type host struct {
	name, token string
	key         []byte
}

// Run runs one storm. An error means the storm could not be set up;
// everything that went wrong in the storm itself is in Result.Problems.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if cfg.Replicas == 0 {
		cfg.Replicas = 3
	}
	if cfg.Replicas < 2 || cfg.VMs < 1 || cfg.Synthetic < 2 {
		return nil, fmt.Errorf("storm: need 2+ replicas, 1+ VMs and 2+ synthetic hosts (have %d, %d, %d)", cfg.Replicas, cfg.VMs, cfg.Synthetic)
	}
	if cfg.AttackEach == 0 {
		cfg.AttackEach = 5 * time.Second
	}
	if cfg.VMMemoryMB == 0 {
		cfg.VMMemoryMB = 320
	}
	if cfg.BootTimeout == 0 {
		cfg.BootTimeout = 15 * time.Minute
	}
	log := cfg.Log
	if log == nil {
		log = io.Discard
	}
	logf := func(format string, a ...any) { fmt.Fprintf(log, "storm: "+format+"\n", a...) }

	bins, err := harness.Binaries(ctx)
	if err != nil {
		return nil, err
	}
	k, err := kernelcache.Find()
	if err != nil {
		return nil, err
	}
	cluster, err := etcdtest.Start(ctx, filepath.Join(cfg.Dir, "etcd"), 3)
	if err != nil {
		return nil, err
	}
	defer cluster.Stop()
	etcdFlags := []string{"--store", "etcd", "--etcd-endpoints", strings.Join(cluster.Endpoints(), ",")}

	// The first replica's folder is made by init (master key, TLS key,
	// the master key's id in etcd); the others get copies of master.key
	// and tls.key, as the README says.
	dataDirs := make([]string, cfg.Replicas)
	for i := range dataDirs {
		dataDirs[i] = filepath.Join(cfg.Dir, fmt.Sprintf("keyserver-%d", i))
	}
	if _, err := harness.RunTool(ctx, bins.KeyServer, append([]string{"init", "--data", dataDirs[0]}, etcdFlags...)...); err != nil {
		return nil, err
	}
	for _, d := range dataDirs[1:] {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
		for _, f := range []string{"master.key", "tls.key"} {
			b, err := os.ReadFile(filepath.Join(dataDirs[0], f))
			if err != nil {
				return nil, err
			}
			if err := os.WriteFile(filepath.Join(d, f), b, 0o600); err != nil {
				return nil, err
			}
		}
	}

	// The VMs' hosts are enrolled with the binary, as an operator would;
	// the synthetic ones through the admin API (thousands of runs of the
	// binary would take minutes).
	vmHosts := make([]host, cfg.VMs)
	for i := range vmHosts {
		h := host{name: harness.RandomUUID()}
		tok, err := harness.RunTool(ctx, bins.KeyServer, append(append([]string{"host", "add", "--data", dataDirs[0]}, etcdFlags...), h.name)...)
		if err != nil {
			return nil, err
		}
		h.token = strings.TrimSpace(string(tok))
		if h.key, err = harness.RunTool(ctx, bins.KeyServer, append(append([]string{"host", "key", "--data", dataDirs[0]}, etcdFlags...), h.name)...); err != nil {
			return nil, err
		}
		vmHosts[i] = h
	}
	t0 := time.Now()
	synHosts, err := enroll(ctx, dataDirs[0], cluster.Endpoints(), cfg.Synthetic)
	if err != nil {
		return nil, err
	}
	logf("enrolled %d VM hosts (binary) and %d synthetic hosts (admin API, %s) in etcd", cfg.VMs, cfg.Synthetic, time.Since(t0).Round(time.Millisecond))

	replicas := make([]*harness.KeyServer, cfg.Replicas)
	for i := range replicas {
		var slog io.Writer
		if cfg.ServerLog != nil {
			slog = prefixed(cfg.ServerLog, fmt.Sprintf("replica-%d ", i))
		}
		ks, err := harness.StartKeyServer(ctx, bins.KeyServer, dataDirs[i], "", slog, etcdFlags...)
		if err != nil {
			return nil, err
		}
		defer ks.Stop()
		replicas[i] = ks
	}
	for _, ks := range replicas[1:] {
		if ks.Pin != replicas[0].Pin {
			return nil, fmt.Errorf("storm: replicas have different pins (%s, %s) although they share tls.key", replicas[0].Pin, ks.Pin)
		}
	}
	p, err := pin.Parse(replicas[0].Pin)
	if err != nil {
		return nil, err
	}

	// One image for every VM: the host id is the SMBIOS UUID and the
	// token an SMBIOS credential, so only the disk and QEMU's arguments
	// differ. Every VM lists the replica that is killed first.
	var guestURLs []string
	for _, ks := range replicas {
		guestURLs = append(guestURLs, ks.GuestURL())
	}
	img, err := harness.BuildImage(ctx, bins, harness.ImageConfig{URLs: guestURLs, Pins: []string{replicas[0].Pin}}, mkdir(cfg.Dir, "image"))
	if err != nil {
		return nil, err
	}
	deadGuest, err := harness.GuestAddr(replicas[0].Addr)
	if err != nil {
		return nil, err
	}
	fixtures := make([]*harness.Fixture, cfg.VMs)
	for i, h := range vmHosts {
		if fixtures[i], err = harness.NewFixture(ctx, mkdir(cfg.Dir, fmt.Sprintf("vm-%d", i)), h.key); err != nil {
			return nil, err
		}
	}
	logf("%d replicas on 3 etcd members, image and %d disks ready; storm starts", cfg.Replicas, cfg.VMs)

	// The VMs run side by side; the machine-wide lock keeps other
	// harness VMs out meanwhile.
	release, err := harness.LockVMs(ctx, "storm", log)
	if err != nil {
		return nil, err
	}
	defer release()

	res := &Result{Cfg: cfg, ReplicaPeakRSS: map[string]int64{}, Enrolled: cfg.VMs + cfg.Synthetic, Replicas: cfg.Replicas}
	res.VMs = make([]VMResult, cfg.VMs)
	start := time.Now()
	var (
		initStarted = make(chan struct{})
		startedOnce sync.Once
		vmKeys      atomic.Int64
		vmWG        sync.WaitGroup
	)
	for i, h := range vmHosts {
		name := fmt.Sprintf("storm-vm%d", i)
		vm, err := harness.Start(ctx, harness.VMOptions{
			Name:       name,
			Kernel:     k.Vmlinuz,
			Initramfs:  img,
			Disks:      []harness.Drive{{Path: fixtures[i].Disk.Path}},
			UUID:       h.name,
			SMBIOS:     []string{harness.TokenCredential(h.token)},
			MemoryMB:   cfg.VMMemoryMB,
			CPUs:       1,
			Timeout:    cfg.BootTimeout + time.Minute,
			SerialLog:  filepath.Join(cfg.Dir, name+"-serial.log"),
			Concurrent: true,
		}, prefixed(log, name+" "))
		if err != nil {
			return nil, err
		}
		defer vm.Kill()
		vmWG.Add(1)
		go func() {
			defer vmWG.Done()
			res.VMs[i] = bootVM(vm, name, h, deadGuest, fixtures[i], cfg.BootTimeout, func() { startedOnce.Do(func() { close(initStarted) }) }, &vmKeys)
			startedOnce.Do(func() { close(initStarted) }) // a VM that failed early must not hold the kills up
		}()
	}

	// Wave 1 now, wave 2 at the kills.
	var synOK atomic.Int64
	syn := &synthetic{hosts: synHosts, pin: p, replicas: replicas, timeout: cfg.BootTimeout, ok: &synOK}
	half := len(synHosts) / 2
	var synWG sync.WaitGroup
	syn.wave(ctx, &synWG, 0, half)

	// The attacker goes for the first VM's host id at the replicas that
	// stay up, one attack after another, until every host is done.
	actx, stopAttack := context.WithCancel(ctx)
	attackDone := make(chan struct{})
	go func() {
		defer close(attackDone)
		ats := abuse.Attacks()
		for n := 0; actx.Err() == nil; n++ {
			at := ats[n%len(ats)]
			r := 1 + n%(cfg.Replicas-1)
			ectx, cancel := context.WithTimeout(actx, cfg.AttackEach)
			a := abuse.NewAttacker(ectx, replicas[r].Addr, vmHosts[0].name)
			at.Run(a)
			cancel()
			a.CloseAll()
			res.Attacks = append(res.Attacks, fmt.Sprintf("%s@replica-%d", at.Name, r))
			res.AttackAttempts += a.Attempts()
		}
	}()

	select {
	case <-initStarted:
	case <-ctx.Done():
		stopAttack()
		return nil, ctx.Err()
	}
	res.ServedBeforeKill = int(synOK.Load())
	res.VMKeysBeforeKill = int(vmKeys.Load())
	syn.wave(ctx, &synWG, half, len(synHosts))
	replicas[0].Kill()
	res.KilledReplica = "replica-0 " + replicas[0].Addr
	lctx, cancel := context.WithTimeout(ctx, time.Minute)
	leader, err := cluster.Leader(lctx)
	cancel()
	if err != nil {
		stopAttack()
		return nil, fmt.Errorf("storm: finding the etcd leader to kill: %w", err)
	}
	cluster.Kill(leader)
	res.KilledEtcd = cluster.Members[leader].Name
	res.KillAt = time.Since(start)
	logf("killed %s and etcd leader %s at %s (%d synthetic hosts and %d VMs had their key)",
		res.KilledReplica, res.KilledEtcd, res.KillAt.Round(time.Millisecond), res.ServedBeforeKill, res.VMKeysBeforeKill)

	synWG.Wait()
	vmWG.Wait()
	stopAttack()
	<-attackDone
	res.Elapsed = time.Since(start)
	res.SyntheticOK, res.SyntheticLat, res.SyntheticErr = syn.results()

	for i, ks := range replicas[1:] {
		_, peak, err := harness.ProcMemory(ks.PID())
		if err != nil {
			return nil, err
		}
		res.ReplicaPeakRSS[fmt.Sprintf("replica-%d", i+1)] = peak
	}
	all := append(slices.Clone(vmHosts), synHosts...)
	// Every VM's token and a sample of the synthetic ones (all of them
	// would mean thousands of scans of megabytes of audit lines).
	sample := slices.Clone(vmHosts)
	for i := 0; i < len(synHosts); i += 20 {
		sample = append(sample, synHosts[i])
	}
	for _, ks := range replicas {
		logs := ks.Logs()
		for _, h := range sample {
			if strings.Contains(logs, h.token) {
				res.Leaks = append(res.Leaks, h.name)
			}
		}
	}
	// Nothing lost: every host is still in the store, on the etcd
	// members left, with the key it was enrolled with.
	if res.Lost, err = lost(ctx, dataDirs[1], cluster.Endpoints(), all); err != nil {
		return nil, err
	}
	return res, nil
}

// bootVM follows one VM's console: the init's first line (started), the
// key line, switch root, and the real init's report, whose data file
// must be the one on the VM's own disk.
func bootVM(vm *harness.VM, name string, h host, deadGuestAddr string, fx *harness.Fixture, timeout time.Duration, started func(), keysGot *atomic.Int64) VMResult {
	r := VMResult{Name: name, Host: h.name}
	fail := func(err error) VMResult {
		r.Err = err
		return r
	}
	if _, err := vm.ExpectLineAt(`^unlockrd: `, timeout); err != nil {
		return fail(err)
	}
	started()
	// The key stage's line (not the lines of failed attempts before it).
	l, err := vm.ExpectLineAt(`^unlockrd: key: [0-9]+ key\(s\) for host `, timeout)
	if err != nil {
		return fail(err)
	}
	keysGot.Add(1)
	m := regexp.MustCompile(`^unlockrd: key: .* for host (\S+) from (\S+) \(([0-9.]+)s\)$`).FindStringSubmatch(l.Text)
	if m == nil || m[1] != h.name {
		return fail(fmt.Errorf("%s: key line %q does not name host %s and a duration", name, l.Text, h.name))
	}
	secs, _ := strconv.ParseFloat(m[3], 64)
	r.KeyAt, r.KeyStage, r.Server = l.At, time.Duration(secs*float64(time.Second)), m[2]
	// The killed replica is first in the image's URLs: the client must
	// have tried it and moved on.
	_, r.FailedOver = vm.Find(`^unlockrd: key: ` + regexp.QuoteMeta(deadGuestAddr) + `: .*(refused|trying|retrying)`)
	l, err = vm.ExpectLineAt(`^unlockrd: switch root: exec /sbin/init`, timeout)
	if err != nil {
		return fail(err)
	}
	r.SwitchRootAt = l.At
	rep, err := vm.ExpectReport(timeout)
	if err != nil {
		return fail(err)
	}
	if f, ok := rep.Files[harness.HelloPath]; !ok || f.SHA256 != fx.HelloSHA256() {
		return fail(fmt.Errorf("%s: data file %s = %+v, want sha256 %s", name, harness.HelloPath, f, fx.HelloSHA256()))
	}
	if mt, ok := rep.Mount(harness.DataMountPoint); !ok || mt.Source != "/dev/mapper/data" {
		return fail(fmt.Errorf("%s: data mount = %+v, want /dev/mapper/data", name, mt))
	}
	if err := vm.Wait(timeout); err != nil {
		return fail(err)
	}
	return r
}

// synthetic runs the synthetic hosts: each one fetch with the boot client,
// retrying and failing over as a booting host does, from its own loopback
// address, the replicas listed starting at a different one per host.
type synthetic struct {
	hosts    []host
	pin      pin.Pin
	replicas []*harness.KeyServer
	timeout  time.Duration
	ok       *atomic.Int64

	mu   sync.Mutex
	lat  []time.Duration
	errs []string
}

func (s *synthetic) wave(ctx context.Context, wg *sync.WaitGroup, from, to int) {
	for i := from; i < to; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.fetch(ctx, i)
		}()
	}
}

func (s *synthetic) fetch(ctx context.Context, i int) {
	h := s.hosts[i]
	var urls []string
	for j := range s.replicas {
		ks := s.replicas[(i+j)%len(s.replicas)]
		urls = append(urls, "https://"+ks.Addr+keyserver.KeysPath+"{host}")
	}
	src := net.IPv4(127, byte(1+i/(250*250)), byte(i/250%250+1), byte(i%250+1))
	tok := []byte(h.token)
	defer clear(tok)
	t0 := time.Now()
	k, err := keys.Fetch(ctx, keys.Config{
		URLs:        urls,
		Pins:        []pin.Pin{s.pin},
		Host:        h.name,
		Token:       tok,
		GiveUpAfter: s.timeout,
		LocalAddr:   &net.TCPAddr{IP: src},
	}, ulog.Null)
	d := time.Since(t0)
	if err == nil {
		defer k.Wipe()
		if len(k.Keys) == 0 || !bytes.Equal(k.Keys[0].Bytes(), h.key) {
			err = errors.New("wrong key served")
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.errs = append(s.errs, fmt.Sprintf("%s: %v", h.name, err))
		return
	}
	s.ok.Add(1)
	s.lat = append(s.lat, d)
}

func (s *synthetic) results() (int, []time.Duration, []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return int(s.ok.Load()), slices.Clone(s.lat), slices.Clone(s.errs)
}

// enroll adds n synthetic hosts to the etcd store, a few at a time.
func enroll(ctx context.Context, dir string, endpoints []string, n int) ([]host, error) {
	d, err := keyserver.OpenData(ctx, dir, keyserver.DataOptions{Etcd: &etcdstore.Options{Endpoints: endpoints}})
	if err != nil {
		return nil, err
	}
	defer d.Close()
	a := d.Admin()
	hosts := make([]host, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	work := make(chan int)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				h := host{name: fmt.Sprintf("synthetic-%04d", i)}
				if h.token, errs[i] = a.AddHost(ctx, h.name, nil); errs[i] != nil {
					continue
				}
				var ks [][]byte
				if _, ks, errs[i] = a.Keys(ctx, h.name); errs[i] == nil {
					h.key = ks[0]
				}
				hosts[i] = h
			}
		}()
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("storm: enrolling synthetic hosts: %w", err)
	}
	return hosts, nil
}

// lost opens the store through a surviving replica's folder and returns
// the hosts that are missing or whose current key changed.
func lost(ctx context.Context, dir string, endpoints []string, hosts []host) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	d, err := keyserver.OpenData(ctx, dir, keyserver.DataOptions{Etcd: &etcdstore.Options{Endpoints: endpoints}})
	if err != nil {
		return nil, fmt.Errorf("storm: opening the store after the storm: %w", err)
	}
	defer d.Close()
	a := d.Admin()
	var out []string
	for _, h := range hosts {
		_, ks, err := a.Keys(ctx, h.name)
		switch {
		case err != nil:
			out = append(out, fmt.Sprintf("%s: %v", h.name, err))
		case len(ks) == 0 || !bytes.Equal(ks[0], h.key):
			out = append(out, h.name+": current key changed")
		}
	}
	return out, nil
}

// Problems lists every way the storm fell short; none means it passed.
func (r *Result) Problems() []string {
	var p []string
	for _, v := range r.VMs {
		if v.Err != nil {
			p = append(p, fmt.Sprintf("VM %s (host %s) did not boot: %v", v.Name, v.Host, v.Err))
		} else if !v.FailedOver {
			p = append(p, fmt.Sprintf("VM %s shows no failed attempt at the killed replica", v.Name))
		}
	}
	if r.SyntheticOK != r.Cfg.Synthetic {
		p = append(p, fmt.Sprintf("%d of %d synthetic hosts got their key", r.SyntheticOK, r.Cfg.Synthetic))
	}
	for i, e := range r.SyntheticErr {
		if i == 5 {
			p = append(p, fmt.Sprintf("... and %d more synthetic failures", len(r.SyntheticErr)-5))
			break
		}
		p = append(p, "synthetic host "+e)
	}
	if r.VMKeysBeforeKill != 0 {
		p = append(p, fmt.Sprintf("%d VMs had their key before the kills: the storm did not test their failover", r.VMKeysBeforeKill))
	}
	if r.ServedBeforeKill >= r.Cfg.Synthetic {
		p = append(p, "every synthetic host had its key before the kills")
	}
	if len(r.Attacks) == 0 || r.AttackAttempts == 0 {
		p = append(p, "no attack ran")
	}
	for name, peak := range r.ReplicaPeakRSS {
		if peak > MaxPeakRSS {
			p = append(p, fmt.Sprintf("%s peak RSS %.1f MiB, bound %d MiB", name, float64(peak)/(1<<20), MaxPeakRSS>>20))
		}
	}
	for i, l := range r.Lost {
		if i == 5 {
			p = append(p, fmt.Sprintf("... and %d more hosts lost", len(r.Lost)-5))
			break
		}
		p = append(p, "lost after the storm: "+l)
	}
	if len(r.Leaks) > 0 {
		p = append(p, fmt.Sprintf("tokens of %d hosts in the replicas' output (e.g. %s)", len(r.Leaks), r.Leaks[0]))
	}
	return p
}

// Report is the storm's summary, one line each.
func (r *Result) Report() []string {
	var keyAt, stage []time.Duration
	var lines []string
	for _, v := range r.VMs {
		if v.Err == nil {
			keyAt, stage = append(keyAt, v.KeyAt), append(stage, v.KeyStage)
			lines = append(lines, fmt.Sprintf("storm: %s: key from %s at %.2fs after QEMU start (key stage %.2fs, failed over from the killed replica: %t), switch root at %.2fs",
				v.Name, v.Server, v.KeyAt.Seconds(), v.KeyStage.Seconds(), v.FailedOver, v.SwitchRootAt.Seconds()))
		}
	}
	s := func(d time.Duration) string { return fmt.Sprintf("%.2fs", d.Seconds()) }
	out := []string{
		fmt.Sprintf("storm: %d VMs (%d MiB, 1 vCPU, TCG) + %d synthetic hosts (boot client, own loopback address each) against %d replicas on 3 etcd members; %d hosts enrolled",
			r.Cfg.VMs, r.Cfg.VMMemoryMB, r.Cfg.Synthetic, r.Replicas, r.Enrolled),
		fmt.Sprintf("storm: killed %s and etcd leader %s at %s, when %d synthetic hosts and %d VMs had their key; took %s",
			r.KilledReplica, r.KilledEtcd, s(r.KillAt), r.ServedBeforeKill, r.VMKeysBeforeKill, r.Elapsed.Round(time.Second)),
		fmt.Sprintf("storm: attacker: %d attacks (%s each, at the surviving replicas), %d connections/requests",
			len(r.Attacks), r.Cfg.AttackEach, r.AttackAttempts),
	}
	out = append(out, lines...)
	booted := len(keyAt)
	out = append(out,
		fmt.Sprintf("storm: VMs booted %d/%d; time to key since QEMU start p50 %s p99 %s; key stage p50 %s p99 %s",
			booted, len(r.VMs), s(Percentile(keyAt, 0.5)), s(Percentile(keyAt, 0.99)), s(Percentile(stage, 0.5)), s(Percentile(stage, 0.99))),
		fmt.Sprintf("storm: synthetic hosts with their key %d/%d; time to key p50 %s p99 %s max %s",
			r.SyntheticOK, r.Cfg.Synthetic, s(Percentile(r.SyntheticLat, 0.5)), s(Percentile(r.SyntheticLat, 0.99)), s(Percentile(r.SyntheticLat, 1))))
	names := make([]string, 0, len(r.ReplicaPeakRSS))
	for n := range r.ReplicaPeakRSS {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		out = append(out, fmt.Sprintf("storm: %s peak RSS %.1f MiB", n, float64(r.ReplicaPeakRSS[n])/(1<<20)))
	}
	out = append(out, fmt.Sprintf("storm: after the storm %d of %d hosts are in the store with their keys", r.Enrolled-len(r.Lost), r.Enrolled))
	return out
}

// Percentile is the p-quantile (0..1) of ds, 0 for none.
func Percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func mkdir(parent, name string) string {
	d := filepath.Join(parent, name)
	_ = os.MkdirAll(d, 0o755)
	return d
}

// prefixed writes each write's lines to w with a prefix.
func prefixed(w io.Writer, prefix string) io.Writer {
	return &prefixWriter{w: w, prefix: prefix}
}

type prefixWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range strings.SplitAfter(string(b), "\n") {
		if l != "" {
			io.WriteString(p.w, p.prefix+l)
		}
	}
	return len(b), nil
}
