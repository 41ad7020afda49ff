package netup

// Integration tests: netboot.Up runs in a child process inside a network
// namespace ("client") whose links are veth pairs to other namespaces
// where a real dnsmasq serves DHCPv4, DHCPv6 and router advertisements.
// The parent inspects the client namespace with ip(8) between Up and
// Teardown, so every assertion is about the kernel's real state.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/netboot/ipconf"
	"github.com/unlockrd/unlockrd/netboot/nstest"
)

const childEnv = "NETBOOT_TEST_CHILD"

func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		os.Exit(runChild(spec))
	}
	os.Exit(m.Run())
}

// childSpec is what the child runs.
type childSpec struct {
	IP             []string
	Nameservers    []string
	ResolvConf     string
	CarrierTimeout time.Duration
	MethodTimeout  time.Duration
	LinkTimeout    time.Duration
	Deadline       time.Duration // of Up's context
	NoDrivers      bool          // leave DriversLoaded nil
}

// childResult is the child's report after Up.
type childResult struct {
	Err      string
	Link     string
	Method   string
	Addrs    []string
	Gateway  string
	DNS      []string
	Search   []string
	Hostname string // the result's
	UTSName  string // the kernel's host name, as set
	String   string
	Took     time.Duration
}

type stderrLog struct{ mu sync.Mutex }

func (l *stderrLog) Printf(format string, v ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(os.Stderr, "network: "+format+"\n", v...)
}

// runChild is the child process: Up, report, wait for "teardown" on
// stdin, Teardown, report the host name, exit.
func runChild(spec string) int {
	var s childSpec
	if err := json.Unmarshal([]byte(spec), &s); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	loaded := make(chan struct{})
	close(loaded)
	plan, err := ipconf.Parse(s.IP)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ns, err := ipconf.ParseNameservers(s.Nameservers)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	cfg := Config{Plan: plan, Nameservers: ns, ResolvConf: s.ResolvConf,
		CarrierTimeout: s.CarrierTimeout, MethodTimeout: s.MethodTimeout, LinkTimeout: s.LinkTimeout,
		DriversLoaded: loaded, Debug: true}
	if s.NoDrivers {
		cfg.DriversLoaded = nil
	}
	ctx := context.Background()
	if s.Deadline > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.Deadline)
		defer cancel()
	}
	res, err := Up(ctx, cfg, &stderrLog{})
	var out childResult
	if err != nil {
		out.Err = err.Error()
	} else {
		out = childResult{Link: res.Link, Method: res.Method, Hostname: res.Hostname, Search: res.Search,
			String: res.String(), Took: res.Took}
		for _, a := range res.Addrs {
			out.Addrs = append(out.Addrs, a.String())
		}
		for _, a := range res.DNS {
			out.DNS = append(out.DNS, a.String())
		}
		if res.Gateway.IsValid() {
			out.Gateway = res.Gateway.String()
		}
	}
	out.UTSName, _ = os.Hostname()
	json.NewEncoder(os.Stdout).Encode(out)
	if err != nil {
		return 0
	}
	sc := bufio.NewScanner(os.Stdin)
	if !sc.Scan() || sc.Text() != "teardown" {
		return 3
	}
	terr := res.Teardown()
	var after childResult
	if terr != nil {
		after.Err = terr.Error()
	}
	after.UTSName, _ = os.Hostname()
	json.NewEncoder(os.Stdout).Encode(after)
	return 0
}

// child is a running child process.
type child struct {
	t     testing.TB
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
	mu    sync.Mutex
	logs  bytes.Buffer
	done  chan struct{}
}

func startChild(t testing.TB, ns *nstest.NS, s childSpec) *child {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	spec, _ := json.Marshal(s)
	c := &child{t: t, done: make(chan struct{})}
	// Its own UTS namespace: the child sets the host name.
	c.cmd = ns.Command(t.Context(), "unshare", "--uts", exe, "-test.run=^$")
	c.cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
	c.stdin, _ = c.cmd.StdinPipe()
	stdout, _ := c.cmd.StdoutPipe()
	c.out = bufio.NewScanner(stdout)
	pr, pw := io.Pipe()
	c.cmd.Stderr = pw
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			c.mu.Lock()
			c.logs.WriteString(sc.Text() + "\n")
			c.mu.Unlock()
		}
	}()
	go func() {
		_ = c.cmd.Wait()
		pw.Close()
		close(c.done)
	}()
	t.Cleanup(func() {
		c.stdin.Close()
		select {
		case <-c.done:
		case <-time.After(30 * time.Second):
			_ = c.cmd.Process.Kill()
			<-c.done
		}
		t.Logf("child log:\n%s", c.log())
	})
	return c
}

func (c *child) log() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.logs.String()
}

// result reads the child's next report.
func (c *child) result() childResult {
	c.t.Helper()
	if !c.out.Scan() {
		<-c.done
		c.t.Fatalf("child ended without a report: %v\n%s", c.cmd.ProcessState, c.log())
	}
	var r childResult
	if err := json.Unmarshal(c.out.Bytes(), &r); err != nil {
		c.t.Fatalf("child report %q: %v", c.out.Text(), err)
	}
	return r
}

func (c *child) up() childResult {
	c.t.Helper()
	r := c.result()
	c.t.Logf("Up: %+v", r)
	if r.Err != "" {
		c.t.Fatalf("Up failed: %s\n%s", r.Err, c.log())
	}
	return r
}

func (c *child) teardown() childResult {
	c.t.Helper()
	fmt.Fprintln(c.stdin, "teardown")
	r := c.result()
	if r.Err != "" {
		c.t.Errorf("Teardown: %s", r.Err)
	}
	<-c.done
	return r
}

// lines returns the child's console lines for link.
func (c *child) lines(re string) []string {
	var out []string
	for _, l := range strings.Split(c.log(), "\n") {
		if regexp.MustCompile(re).MatchString(l) {
			out = append(out, l)
		}
	}
	return out
}

// linkState is one link of a namespace, from `ip -j addr`.
type linkState struct {
	Name  string   `json:"ifname"`
	Flags []string `json:"flags"`
	MTU   int      `json:"mtu"`
	Addr  []struct {
		Family    string `json:"family"`
		Local     string `json:"local"`
		PrefixLen int    `json:"prefixlen"`
		Scope     string `json:"scope"`
	} `json:"addr_info"`
}

func (l linkState) up() bool { return slices.Contains(l.Flags, "UP") }

// global returns the link's addresses that are not link-local.
func (l linkState) global() []string {
	var out []string
	for _, a := range l.Addr {
		if a.Scope == "global" {
			out = append(out, fmt.Sprintf("%s/%d", a.Local, a.PrefixLen))
		}
	}
	return out
}

type routeState struct {
	Dst      string   `json:"dst"`
	Gateway  string   `json:"gateway"`
	Dev      string   `json:"dev"`
	Protocol string   `json:"protocol"`
	Flags    []string `json:"flags"`
}

func (r routeState) String() string {
	s := r.Dst
	if r.Gateway != "" {
		s += " via " + r.Gateway
	}
	s += " dev " + r.Dev
	if slices.Contains(r.Flags, "onlink") {
		s += " onlink"
	}
	return s
}

type nsState struct {
	links  map[string]linkState
	routes []string // "dst [via gw] dev d", IPv4 and IPv6 main tables, kernel routes left out
}

func state(t testing.TB, ns *nstest.NS) nsState {
	t.Helper()
	st := nsState{links: map[string]linkState{}}
	out, err := ns.Output("-j", "addr", "show")
	if err != nil {
		t.Fatal(err)
	}
	var ls []linkState
	if err := json.Unmarshal(out, &ls); err != nil {
		t.Fatalf("ip -j addr: %v", err)
	}
	for _, l := range ls {
		st.links[l.Name] = l
	}
	for _, fam := range []string{"-4", "-6"} {
		out, err := ns.Output(fam, "-j", "route", "show", "table", "main")
		if err != nil {
			t.Fatal(err)
		}
		var rs []routeState
		if err := json.Unmarshal(out, &rs); err != nil {
			t.Fatalf("ip -j route: %v", err)
		}
		for _, r := range rs {
			if r.Protocol == "kernel" {
				continue
			}
			st.routes = append(st.routes, r.String())
		}
	}
	return st
}

// net is one test network: a client namespace and server namespaces,
// each linked to the client by a veth pair.
type testNet struct {
	t      testing.TB
	client *nstest.NS
}

func newTestNet(t testing.TB) *testNet {
	t.Helper()
	if err := nstest.RequireRoot(); err != nil {
		t.Fatal(err)
	}
	c, err := nstest.New("nbc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &testNet{t: t, client: c}
}

// server adds a server namespace linked to the client: the client side
// is link (with mac), the server side "s0" with addrs, up.
func (n *testNet) server(link, mac string, addrs ...string) *nstest.NS {
	n.t.Helper()
	s, err := nstest.New("nbs")
	if err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { s.Close() })
	if err := nstest.Veth(n.client, link, mac, s, "s0", ""); err != nil {
		n.t.Fatal(err)
	}
	// Servers answer at once: no duplicate address detection delay on
	// their side (the client's side is what is under test).
	for _, cmd := range [][]string{{"sysctl", "-qw", "net.ipv6.conf.s0.accept_dad=0"}} {
		if out, err := s.Command(n.t.Context(), cmd[0], cmd[1:]...).CombinedOutput(); err != nil {
			n.t.Fatalf("%v: %v %s", cmd, err, out)
		}
	}
	for _, a := range addrs {
		if err := s.IP("addr", "add", a, "dev", "s0"); err != nil {
			n.t.Fatal(err)
		}
	}
	if err := s.IP("link", "set", "s0", "up"); err != nil {
		n.t.Fatal(err)
	}
	return s
}

func dnsmasq(t testing.TB, s *nstest.NS, args ...string) *nstest.Dnsmasq {
	t.Helper()
	d, err := s.StartDnsmasq(append([]string{"--interface=s0"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Stop()
		t.Logf("dnsmasq log:\n%s", d.Logs())
	})
	return d
}

// reach checks that the client namespace connects to a TCP listener in
// the server namespace at each address.
func reach(t testing.TB, client, server *nstest.NS, addrs ...string) {
	t.Helper()
	var l net.Listener
	if err := server.Do(func() (err error) {
		l, err = net.Listen("tcp", "[::]:7777")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	for _, a := range addrs {
		err := client.Do(func() error {
			c, err := net.DialTimeout("tcp", net.JoinHostPort(a, "7777"), 10*time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err != nil {
			t.Errorf("client cannot reach %s: %v", a, err)
		}
	}
}

func readFile(t testing.TB, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return string(b)
}

// dhcp4Server is the usual DHCPv4 setup: option 121 with a static route
// and a default route that differs from the router option (which RFC 3442
// says to ignore), two DNS servers and two search domains.
var dhcp4Server = []string{
	"--dhcp-range=10.77.0.50,10.77.0.99,255.255.255.0,1h",
	"--dhcp-option=option:router,10.77.0.9",
	"--dhcp-option=option:classless-static-route,192.168.50.0/24,10.77.0.2,0.0.0.0/0,10.77.0.1",
	"--dhcp-option=option:dns-server,10.77.0.53,10.77.0.54",
	"--dhcp-option=option:domain-search,example.test,corp.test",
}

func TestIntegrationDHCPv4(t *testing.T) {
	n := newTestNet(t)
	srv := n.server("eth0", "52:54:00:77:00:10", "10.77.0.1/24")
	dnsmasq(t, srv, append(dhcp4Server, "--dhcp-host=52:54:00:77:00:10,10.77.0.66,dbhost")...)
	resolv := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(resolv, []byte("# before\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c := startChild(t, n.client, childSpec{ResolvConf: resolv, Nameservers: []string{"10.9.9.9"}})
	r := c.up()

	if r.Link != "eth0" || r.Method != "dhcp" || !slices.Equal(r.Addrs, []string{"10.77.0.66/24"}) {
		t.Errorf("result %+v, want eth0 10.77.0.66/24 via dhcp", r)
	}
	st := state(t, n.client)
	if got := st.links["eth0"].global(); !slices.Equal(got, []string{"10.77.0.66/24"}) || !st.links["eth0"].up() {
		t.Errorf("eth0 addresses %v (up %v), want 10.77.0.66/24, up", got, st.links["eth0"].up())
	}
	for _, want := range []string{"default via 10.77.0.1 dev eth0", "192.168.50.0/24 via 10.77.0.2 dev eth0"} {
		if !slices.Contains(st.routes, want) {
			t.Errorf("routes %q lack %q (option 121)", st.routes, want)
		}
	}
	if slices.ContainsFunc(st.routes, func(r string) bool { return strings.Contains(r, "10.77.0.9") }) {
		t.Errorf("routes %q use the router option although option 121 was given", st.routes)
	}
	wantResolv := "# written by unlockrd's network stage\nnameserver 10.9.9.9\nnameserver 10.77.0.53\nnameserver 10.77.0.54\nsearch example.test corp.test\n"
	if got := readFile(t, resolv); got != wantResolv {
		t.Errorf("resolv.conf:\n%s\nwant:\n%s", got, wantResolv)
	}
	if r.UTSName != "dbhost" {
		t.Errorf("host name %q, want dbhost from DHCP", r.UTSName)
	}
	if ls := c.lines(`^network: eth0: dhcp 10\.77\.0\.66/24 routes .* from 10\.77\.0\.1 lease 1h0m0s, dns .*; configured first.*default: DHCP on every Ethernet link.*link up to configured [0-9.]+s`); len(ls) != 1 {
		t.Errorf("want one line for eth0 saying what it got, why and how long:\n%s", c.log())
	}

	after := c.teardown()
	st = state(t, n.client)
	if got := st.links["eth0"].global(); len(got) != 0 || st.links["eth0"].up() {
		t.Errorf("after teardown eth0 has %v, up %v; want nothing, down", got, st.links["eth0"].up())
	}
	if len(st.routes) != 0 {
		t.Errorf("after teardown routes %q remain", st.routes)
	}
	if got := readFile(t, resolv); got != "# before\n" {
		t.Errorf("after teardown resolv.conf = %q, want the previous content", got)
	}
	if after.UTSName == "dbhost" {
		t.Errorf("after teardown the host name is still %q", after.UTSName)
	}
}

func TestIntegrationRaceFirstLinkWithoutDHCP(t *testing.T) {
	n := newTestNet(t)
	n.server("eth0", "52:54:00:77:01:10", "10.78.0.1/24") // carrier, no DHCP server
	srv := n.server("eth1", "52:54:00:77:01:11", "10.77.0.1/24")
	dnsmasq(t, srv, dhcp4Server...)
	c := startChild(t, n.client, childSpec{ResolvConf: filepath.Join(t.TempDir(), "resolv.conf")})
	r := c.up()
	if r.Link != "eth1" || len(r.Addrs) != 1 || !strings.HasPrefix(r.Addrs[0], "10.77.0.") {
		t.Fatalf("result %+v, want eth1 with a 10.77.0.x lease", r)
	}
	st := state(t, n.client)
	if st.links["eth0"].up() || len(st.links["eth0"].global()) != 0 {
		t.Errorf("the losing link eth0 is up %v with %v; want down, no address", st.links["eth0"].up(), st.links["eth0"].global())
	}
	if !st.links["eth1"].up() {
		t.Errorf("the winner eth1 is down")
	}
	if ls := c.lines(`^network: eth0: eth1 was configured first \(this link: DHCPv4: no lease after [0-9]+ message\(s\) in [0-9.]+s \(no answer\)\); set down$`); len(ls) != 1 {
		t.Errorf("want one line for eth0 saying eth1 won and what eth0 was doing:\n%s", c.log())
	}
	c.teardown()
	st = state(t, n.client)
	for _, l := range []string{"eth0", "eth1"} {
		if st.links[l].up() || len(st.links[l].global()) != 0 {
			t.Errorf("after teardown %s is up %v with %v", l, st.links[l].up(), st.links[l].global())
		}
	}
}

func TestIntegrationSelectByMACWithMTU(t *testing.T) {
	n := newTestNet(t)
	s0 := n.server("eth0", "52:54:00:77:02:10", "10.78.0.1/24")
	dnsmasq(t, s0, "--dhcp-range=10.78.0.50,10.78.0.99,255.255.255.0,1h")
	s1 := n.server("eth1", "52:54:00:77:02:11", "10.77.0.1/24")
	dnsmasq(t, s1, dhcp4Server...)
	// Both links have a DHCP server: only the one named by MAC may be used.
	c := startChild(t, n.client, childSpec{IP: []string{"52-54-00-77-02-11:dhcp:1400"}, ResolvConf: filepath.Join(t.TempDir(), "resolv.conf")})
	r := c.up()
	if r.Link != "eth1" {
		t.Fatalf("result %+v, want eth1 (selected by MAC)", r)
	}
	st := state(t, n.client)
	if st.links["eth1"].MTU != 1400 {
		t.Errorf("eth1 MTU %d, want 1400", st.links["eth1"].MTU)
	}
	if st.links["eth0"].up() {
		t.Errorf("eth0 was brought up although ip= names only eth1's MAC")
	}
	if ls := c.lines(`^network: eth0: not selected by ip=52-54-00-77-02-11:dhcp:1400; left down$`); len(ls) != 1 {
		t.Errorf("want a line saying eth0 is not selected:\n%s", c.log())
	}
	c.teardown()
	st = state(t, n.client)
	if st.links["eth1"].MTU != 1500 || st.links["eth1"].up() {
		t.Errorf("after teardown eth1 MTU %d up %v, want 1500 and down", st.links["eth1"].MTU, st.links["eth1"].up())
	}
}

func TestIntegrationStaticWithoutDHCP(t *testing.T) {
	n := newTestNet(t)
	srv := n.server("eth0", "52:54:00:77:03:10", "10.77.0.1/24", "fd00:77::1/64")
	resolv := filepath.Join(t.TempDir(), "resolv.conf")
	c := startChild(t, n.client, childSpec{ResolvConf: resolv, IP: []string{
		"10.77.0.7::10.77.0.1:255.255.255.0:statichost:eth0:none:10.77.0.53",
		"[fd00:77::7]::[fd00:77::1]:64::eth0:none:[fd00:77::53]",
	}})
	r := c.up()
	if r.Method != "static" || !slices.Equal(r.Addrs, []string{"10.77.0.7/24", "fd00:77::7/64"}) {
		t.Errorf("result %+v, want static 10.77.0.7/24, fd00:77::7/64", r)
	}
	st := state(t, n.client)
	if got := st.links["eth0"].global(); !slices.Equal(got, []string{"10.77.0.7/24", "fd00:77::7/64"}) {
		t.Errorf("eth0 addresses %v", got)
	}
	for _, want := range []string{"default via 10.77.0.1 dev eth0", "default via fd00:77::1 dev eth0"} {
		if !slices.Contains(st.routes, want) {
			t.Errorf("routes %q lack %q", st.routes, want)
		}
	}
	if got := readFile(t, resolv); !strings.Contains(got, "nameserver 10.77.0.53\nnameserver fd00:77::53\n") {
		t.Errorf("resolv.conf:\n%s", got)
	}
	if r.UTSName != "statichost" {
		t.Errorf("host name %q, want statichost", r.UTSName)
	}
	// The addresses work: the client connects to the server over both.
	reach(t, n.client, srv, "10.77.0.1", "fd00:77::1")
	c.teardown()
	st = state(t, n.client)
	if got := st.links["eth0"].global(); len(got) != 0 || len(st.routes) != 0 || st.links["eth0"].up() {
		t.Errorf("after teardown: addresses %v routes %v up %v", got, st.routes, st.links["eth0"].up())
	}
	if _, err := os.Stat(resolv); !os.IsNotExist(err) {
		t.Errorf("after teardown resolv.conf exists (it did not before): %v", err)
	}
}

// A /32 address with a gateway outside it, as some clouds hand out: the
// gateway is reached on-link.
func TestIntegrationStaticOnLinkGateway(t *testing.T) {
	n := newTestNet(t)
	srv := n.server("eth0", "", "172.31.1.1/32")
	if err := srv.IP("route", "add", "203.0.113.7/32", "dev", "s0"); err != nil {
		t.Fatal(err)
	}
	c := startChild(t, n.client, childSpec{IP: []string{"203.0.113.7::172.31.1.1:255.255.255.255::eth0:none"},
		ResolvConf: filepath.Join(t.TempDir(), "resolv.conf")})
	c.up()
	st := state(t, n.client)
	if !slices.Contains(st.routes, "default via 172.31.1.1 dev eth0 onlink") {
		t.Errorf("routes %q lack an on-link default route via 172.31.1.1", st.routes)
	}
	reach(t, n.client, srv, "172.31.1.1")
	c.teardown()
	if st := state(t, n.client); len(st.routes) != 0 || len(st.links["eth0"].global()) != 0 {
		t.Errorf("after teardown: routes %q addresses %v", st.routes, st.links["eth0"].global())
	}
}

func TestIntegrationDHCPv6(t *testing.T) {
	n := newTestNet(t)
	srv := n.server("eth0", "52:54:00:77:04:10", "fd00:77::1/64")
	dnsmasq(t, srv, "--enable-ra", "--dhcp-range=fd00:77::100,fd00:77::1ff,64,1h",
		"--dhcp-option=option6:dns-server,[fd00:77::53]", "--dhcp-option=option6:domain-search,v6.test")
	resolv := filepath.Join(t.TempDir(), "resolv.conf")
	c := startChild(t, n.client, childSpec{IP: []string{"eth0:dhcp6"}, ResolvConf: resolv})
	r := c.up()
	if r.Method != "dhcp6" || len(r.Addrs) != 1 || !regexp.MustCompile(`^fd00:77::1[0-9a-f]{2}/128$`).MatchString(r.Addrs[0]) {
		t.Fatalf("result %+v, want one fd00:77::1xx/128 by dhcp6", r)
	}
	st := state(t, n.client)
	if got := st.links["eth0"].global(); !slices.Contains(got, r.Addrs[0]) {
		t.Errorf("eth0 addresses %v lack %s", got, r.Addrs[0])
	}
	if !slices.ContainsFunc(st.routes, func(s string) bool { return strings.HasPrefix(s, "default via fe80::") }) || !strings.HasPrefix(r.Gateway, "fe80::") {
		t.Errorf("routes %q, gateway %q: want a default route from the router advertisement", st.routes, r.Gateway)
	}
	if got := readFile(t, resolv); !strings.Contains(got, "nameserver fd00:77::53\n") || !strings.Contains(got, "search v6.test\n") {
		t.Errorf("resolv.conf:\n%s", got)
	}
	reach(t, n.client, srv, "fd00:77::1")
	c.teardown()
	st = state(t, n.client)
	if got := st.links["eth0"].global(); len(got) != 0 || len(st.routes) != 0 || st.links["eth0"].up() {
		t.Errorf("after teardown: addresses %v routes %v up %v", got, st.routes, st.links["eth0"].up())
	}
}

// TestIntegrationSLAACSiteLocal is QEMU's user network with ipv6=on: the
// router advertises fec0::/64, whose addresses the kernel gives site
// scope. auto6 takes one (before the fix it waited for a global address
// until its deadline) and says its scope.
func TestIntegrationSLAACSiteLocal(t *testing.T) {
	n := newTestNet(t)
	srv := n.server("eth0", "52:54:00:77:05:11", "fec0::2/64")
	dnsmasq(t, srv, "--enable-ra", "--dhcp-range=fec0::,ra-only,64,1h")
	c := startChild(t, n.client, childSpec{IP: []string{"auto6"}, ResolvConf: filepath.Join(t.TempDir(), "resolv.conf"),
		Deadline: 90 * time.Second})
	r := c.up()
	if r.Method != "auto6" || len(r.Addrs) != 1 || !strings.HasPrefix(r.Addrs[0], "fec0::") || !strings.HasSuffix(r.Addrs[0], "/64") {
		t.Fatalf("result %+v, want one fec0::/64 address by auto6", r)
	}
	reach(t, n.client, srv, "fec0::2")
	c.teardown()
	// After teardown the child has exited: its log is complete.
	if got := c.lines(`auto6 fec0::[0-9a-f:]+/64 \(site-local\)`); len(got) == 0 {
		t.Errorf("no console line giving the address's scope:\n%s", c.log())
	}
}

func TestIntegrationSLAAC(t *testing.T) {
	n := newTestNet(t)
	srv := n.server("eth0", "52:54:00:77:05:10", "fd00:77::1/64")
	dnsmasq(t, srv, "--enable-ra", "--dhcp-range=fd00:77::,ra-only,64,1h",
		"--dhcp-option=option6:dns-server,[fd00:77::53]", "--dhcp-option=option6:domain-search,slaac.test")
	resolv := filepath.Join(t.TempDir(), "resolv.conf")
	c := startChild(t, n.client, childSpec{IP: []string{"auto6"}, ResolvConf: resolv})
	r := c.up()
	if r.Method != "auto6" || len(r.Addrs) != 1 || !strings.HasPrefix(r.Addrs[0], "fd00:77::") || !strings.HasSuffix(r.Addrs[0], "/64") {
		t.Fatalf("result %+v, want one fd00:77::/64 address by auto6", r)
	}
	st := state(t, n.client)
	if got := st.links["eth0"].global(); !slices.Equal(got, r.Addrs) {
		t.Errorf("eth0 addresses %v, want %v", got, r.Addrs)
	}
	if !slices.ContainsFunc(st.routes, func(s string) bool { return strings.HasPrefix(s, "default via fe80::") }) {
		t.Errorf("routes %q: want a default route from the router advertisement", st.routes)
	}
	if got := readFile(t, resolv); !strings.Contains(got, "nameserver fd00:77::53\n") || !strings.Contains(got, "search slaac.test\n") {
		t.Errorf("resolv.conf (RDNSS/DNSSL of the router advertisement):\n%s", got)
	}
	c.teardown()
	st = state(t, n.client)
	if got := st.links["eth0"].global(); len(got) != 0 || len(st.routes) != 0 || st.links["eth0"].up() {
		t.Errorf("after teardown: addresses %v routes %v up %v", got, st.routes, st.links["eth0"].up())
	}
}

func TestIntegrationBadInputFallsBackToDHCP(t *testing.T) {
	for _, tc := range []struct {
		name string
		ip   []string
		line string // the console line that explains the fallback
	}{
		{"unknown link", []string{"eth9:dhcp"}, `^network: ip=eth9:dhcp: no link eth9 \(Ethernet links: eth0\); falling back to DHCP on every link$`},
		// Malformed and contradicting values never reach Up: they are
		// refused when the configuration is read (config tests).
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newTestNet(t)
			srv := n.server("eth0", "", "10.77.0.1/24")
			dnsmasq(t, srv, dhcp4Server...)
			c := startChild(t, n.client, childSpec{IP: tc.ip, ResolvConf: filepath.Join(t.TempDir(), "resolv.conf")})
			r := c.up()
			if r.Link != "eth0" || r.Method != "dhcp" {
				t.Errorf("result %+v, want eth0 by dhcp", r)
			}
			if ls := c.lines(tc.line); len(ls) != 1 {
				t.Errorf("want a line matching %s:\n%s", tc.line, c.log())
			}
			c.teardown()
		})
	}
}

func TestIntegrationNoCarrierIsBounded(t *testing.T) {
	n := newTestNet(t)
	srv := n.server("eth0", "", "10.77.0.1/24")
	if err := srv.IP("link", "set", "s0", "down"); err != nil { // no carrier on eth0
		t.Fatal(err)
	}
	c := startChild(t, n.client, childSpec{IP: []string{"eth0:dhcp"}, CarrierTimeout: time.Second, Deadline: 5 * time.Second,
		ResolvConf: filepath.Join(t.TempDir(), "resolv.conf")})
	r := c.result()
	if !strings.Contains(r.Err, "no carrier within 1s") || !strings.Contains(r.Err, "context deadline exceeded") {
		t.Errorf("Up error %q, want the carrier deadline and the stage deadline", r.Err)
	}
	if ls := c.lines(`^network: eth0: no carrier within 1s \(ip=eth0:dhcp\); set down$`); len(ls) == 0 {
		t.Errorf("no line for eth0's missing carrier:\n%s", c.log())
	}
	if ls := c.lines(`^network: no link configured \(eth0: no carrier within 1s\); retrying every link in [0-9.]+s$`); len(ls) == 0 {
		t.Errorf("no line saying what is retried and when:\n%s", c.log())
	}
	if st := state(t, n.client); st.links["eth0"].up() {
		t.Errorf("eth0 left up after giving up")
	}
}

func TestIntegrationNoneLeavesLinksAlone(t *testing.T) {
	for _, ip := range [][]string{{"none"}, {"eth0:off"}} {
		n := newTestNet(t)
		srv := n.server("eth0", "", "10.77.0.1/24")
		dnsmasq(t, srv, dhcp4Server...)
		c := startChild(t, n.client, childSpec{IP: ip, ResolvConf: filepath.Join(t.TempDir(), "resolv.conf")})
		r := c.up()
		if r.Link != "" || r.Method != "none" || r.String != "no link configured (ip=none)" {
			t.Errorf("ip=%s: result %+v, want no link", ip, r)
		}
		if st := state(t, n.client); st.links["eth0"].up() {
			t.Errorf("ip=%s: eth0 was brought up", ip)
		}
		c.teardown()
	}
}
