package netup

import (
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// BenchmarkUp measures the network stage from setting the link up to the
// link being configured (Result.Took), for each method, against a real
// dnsmasq in network namespaces: the stage's own cost, without a VM's
// driver loading. `make bench` runs it (section "network"); it needs
// root. Each iteration is a fresh child process, so nothing is cached
// in the client; the server keeps its lease, as a real one does.
func BenchmarkUp(b *testing.B) {
	reserved := []string{"--dhcp-range=10.77.0.50,10.77.0.99,255.255.255.0,1h",
		"--dhcp-option=option:router,10.77.0.1", "--dhcp-option=option:dns-server,10.77.0.53",
		"--dhcp-host=52:54:00:77:09:10,10.77.0.60", "--dhcp-host=52:54:00:77:09:11,10.77.0.61"}
	cases := []struct {
		name  string
		ip    []string
		setup func(n *testNet)
		// perRun, when set, gives each iteration its own ip= values.
		perRun func(i int) []string
	}{
		{"dhcp4", nil, func(n *testNet) {
			dnsmasq(n.t, n.server("eth0", "52:54:00:77:09:10", "10.77.0.1/24"), reserved...)
		}, nil},
		// dnsmasq pings a dynamic address before it offers it to a new
		// client: what a first boot against such a server costs. Each
		// run is a new client (ip= sets another MAC address).
		{"dhcp4-new-client-server-pings", nil, func(n *testNet) {
			dnsmasq(n.t, n.server("eth0", "52:54:00:77:09:12", "10.77.0.1/24"), "--dhcp-range=10.77.0.50,10.77.0.99,255.255.255.0,1h")
		}, func(i int) []string { return []string{fmt.Sprintf("eth0:dhcp::52-54-00-77-0a-%02x", i%256)} }},
		{"dhcp4-race-first-link-silent", nil, func(n *testNet) {
			n.server("eth0", "52:54:00:77:09:13", "10.78.0.1/24")
			dnsmasq(n.t, n.server("eth1", "52:54:00:77:09:11", "10.77.0.1/24"), reserved...)
		}, nil},
		{"static4", []string{"10.77.0.7::10.77.0.1:24::eth0:none"}, func(n *testNet) {
			n.server("eth0", "", "10.77.0.1/24")
		}, nil},
		{"static6", []string{"[fd00:77::7]::[fd00:77::1]:64::eth0:none"}, func(n *testNet) {
			n.server("eth0", "", "fd00:77::1/64")
		}, nil},
		{"dhcp6", []string{"eth0:dhcp6"}, func(n *testNet) {
			dnsmasq(n.t, n.server("eth0", "", "fd00:77::1/64"), "--enable-ra", "--dhcp-range=fd00:77::100,fd00:77::1ff,64,1h")
		}, nil},
		{"auto6", []string{"auto6"}, func(n *testNet) {
			dnsmasq(n.t, n.server("eth0", "", "fd00:77::1/64"), "--enable-ra", "--dhcp-range=fd00:77::,ra-only,64,1h")
		}, nil},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			n := newTestNet(b)
			tc.setup(n)
			var took []time.Duration
			for i := 0; b.Loop(); i++ {
				ip := tc.ip
				if tc.perRun != nil {
					ip = tc.perRun(i)
				}
				c := startChild(b, n.client, childSpec{IP: ip, ResolvConf: filepath.Join(b.TempDir(), "resolv.conf")})
				took = append(took, c.up().Took)
				c.teardown()
			}
			slices.Sort(took)
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "ms-median")
			b.ReportMetric(float64(took[0].Microseconds())/1000, "ms-min")
			b.ReportMetric(float64(took[len(took)-1].Microseconds())/1000, "ms-max")
		})
	}
}
