package netup

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/rfc1035label"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func ack(t *testing.T, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
	t.Helper()
	m, err := dhcpv4.New(append([]dhcpv4.Modifier{
		dhcpv4.WithMessageType(dhcpv4.MessageTypeAck),
		dhcpv4.WithYourIP(net.IPv4(10, 0, 0, 5)),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(net.IPv4(10, 0, 0, 1))),
	}, mods...)...)
	if err != nil {
		t.Fatal(err)
	}
	// Through the wire format, as the client receives it.
	m, err = dhcpv4.FromBytes(m.ToBytes())
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func ipnet(s string) *net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return n
}

func TestParseLease4(t *testing.T) {
	pf := netip.MustParsePrefix
	ad := netip.MustParseAddr
	dflt := pf("0.0.0.0/0")
	tests := []struct {
		name string
		mods []dhcpv4.Modifier
		want lease4
	}{
		{"router option", []dhcpv4.Modifier{
			dhcpv4.WithNetmask(net.CIDRMask(24, 32)),
			dhcpv4.WithOption(dhcpv4.OptRouter(net.IPv4(10, 0, 0, 9), net.IPv4(10, 0, 0, 10))),
			dhcpv4.WithOption(dhcpv4.OptDNS(net.IPv4(10, 0, 0, 53), net.IPv4(0, 0, 0, 0), net.IPv4(10, 0, 0, 53))),
			dhcpv4.WithOption(dhcpv4.OptIPAddressLeaseTime(2 * time.Hour)),
		}, lease4{addr: pf("10.0.0.5/24"), routes: []route4{{dst: dflt, gw: ad("10.0.0.9")}},
			dns: []netip.Addr{ad("10.0.0.53")}, server: ad("10.0.0.1"), lease: 2 * time.Hour}},
		{"option 121 replaces the router option", []dhcpv4.Modifier{
			dhcpv4.WithNetmask(net.CIDRMask(24, 32)),
			dhcpv4.WithOption(dhcpv4.OptRouter(net.IPv4(10, 0, 0, 9))),
			dhcpv4.WithOption(dhcpv4.OptClasslessStaticRoute(
				&dhcpv4.Route{Dest: ipnet("192.168.50.0/24"), Router: net.IPv4(10, 0, 0, 2)},
				&dhcpv4.Route{Dest: ipnet("172.16.0.0/12"), Router: net.IPv4(0, 0, 0, 0)},
				&dhcpv4.Route{Dest: ipnet("0.0.0.0/0"), Router: net.IPv4(10, 0, 0, 1)},
				&dhcpv4.Route{Dest: ipnet("198.51.100.0/24"), Router: net.IPv4(224, 0, 0, 1)},
			)),
		}, lease4{addr: pf("10.0.0.5/24"), routes: []route4{
			{dst: pf("192.168.50.0/24"), gw: ad("10.0.0.2")},
			{dst: pf("172.16.0.0/12")},
			{dst: dflt, gw: ad("10.0.0.1")},
		}, server: ad("10.0.0.1")}},
		{"no mask: the class mask", nil, lease4{addr: pf("10.0.0.5/8"), server: ad("10.0.0.1")}},
		{"search list, host name", []dhcpv4.Modifier{
			dhcpv4.WithNetmask(net.CIDRMask(32, 32)),
			dhcpv4.WithOption(dhcpv4.OptDomainSearch(&rfc1035label.Labels{Labels: []string{"example.test", "corp.test"}})),
			dhcpv4.WithOption(dhcpv4.OptDomainName("ignored.test")),
			dhcpv4.WithOption(dhcpv4.OptHostName("db-7")),
		}, lease4{addr: pf("10.0.0.5/32"), search: []string{"example.test", "corp.test"}, hostname: "db-7", server: ad("10.0.0.1")}},
		{"domain name when there is no search list", []dhcpv4.Modifier{
			dhcpv4.WithNetmask(net.CIDRMask(24, 32)),
			dhcpv4.WithOption(dhcpv4.OptDomainName("example.test.")),
		}, lease4{addr: pf("10.0.0.5/24"), search: []string{"example.test"}, server: ad("10.0.0.1")}},
		{"names that would inject configuration are dropped", []dhcpv4.Modifier{
			dhcpv4.WithNetmask(net.CIDRMask(24, 32)),
			dhcpv4.WithOption(dhcpv4.OptDomainName("x.test\nnameserver 6.6.6.6")),
			dhcpv4.WithOption(dhcpv4.OptHostName("evil host")),
		}, lease4{addr: pf("10.0.0.5/24"), server: ad("10.0.0.1")}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseLease4(ack(t, tc.mods...))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
	for _, yi := range []net.IP{net.IPv4zero, net.IPv4bcast, net.IPv4(224, 0, 0, 5), net.IPv4(127, 0, 0, 1)} {
		if _, err := parseLease4(ack(t, dhcpv4.WithYourIP(yi))); err == nil {
			t.Errorf("offered address %s accepted", yi)
		}
	}
}

func TestRoute4Netlink(t *testing.T) {
	local := netip.MustParsePrefix("10.0.0.5/24")
	in := route4Netlink(3, local, route4{dst: netip.MustParsePrefix("0.0.0.0/0"), gw: netip.MustParseAddr("10.0.0.1")})
	if in.Flags != 0 || in.Scope != netlink.SCOPE_UNIVERSE || in.LinkIndex != 3 || in.Protocol != unix.RTPROT_DHCP {
		t.Errorf("gateway inside the subnet: %+v", in)
	}
	out := route4Netlink(3, local, route4{dst: netip.MustParsePrefix("0.0.0.0/0"), gw: netip.MustParseAddr("172.31.1.1")})
	if out.Flags != int(netlink.FLAG_ONLINK) {
		t.Errorf("gateway outside the subnet is not on-link: %+v", out)
	}
	ol := route4Netlink(3, local, route4{dst: netip.MustParsePrefix("172.16.0.0/12")})
	if ol.Gw != nil || ol.Scope != netlink.SCOPE_LINK || ol.Dst.String() != "172.16.0.0/12" {
		t.Errorf("on-link route: %+v", ol)
	}
}

// ndMsg builds an RTM_NEWNDUSEROPT payload for ifindex with options.
func ndMsg(ifindex int, opts ...[]byte) []byte {
	var body []byte
	for _, o := range opts {
		body = append(body, o...)
	}
	b := make([]byte, 16, 16+len(body))
	b[0] = unix.AF_INET6
	binary.NativeEndian.PutUint16(b[2:], uint16(len(body)))
	binary.NativeEndian.PutUint32(b[4:], uint32(ifindex))
	b[8] = 134
	return append(b, body...)
}

func rdnss(lifetime uint32, addrs ...string) []byte {
	o := make([]byte, 8)
	o[0], o[1] = ndOptRDNSS, byte(1+2*len(addrs))
	binary.BigEndian.PutUint32(o[4:], lifetime)
	for _, a := range addrs {
		ip := netip.MustParseAddr(a).As16()
		o = append(o, ip[:]...)
	}
	return o
}

func dnssl(lifetime uint32, names ...string) []byte {
	var wire []byte
	for _, n := range names {
		for _, l := range strings.Split(n, ".") {
			wire = append(wire, byte(len(l)))
			wire = append(wire, l...)
		}
		wire = append(wire, 0)
	}
	for len(wire)%8 != 0 {
		wire = append(wire, 0)
	}
	o := make([]byte, 8)
	o[0], o[1] = ndOptDNSSL, byte(1+len(wire)/8)
	binary.BigEndian.PutUint32(o[4:], lifetime)
	return append(o, wire...)
}

func TestParseNDUserOpt(t *testing.T) {
	msg := ndMsg(7,
		rdnss(600, "2001:db8::53", "2001:db8::54"),
		rdnss(0, "2001:db8::dead"), // withdrawn
		dnssl(600, "example.test", "corp.test"),
		[]byte{24, 1, 0, 0, 0, 0, 0, 0}, // another option (route information), ignored
	)
	idx, dns, search, err := parseNDUserOpt(msg)
	if err != nil {
		t.Fatal(err)
	}
	if idx != 7 || fmt.Sprint(dns) != "[2001:db8::53 2001:db8::54]" || fmt.Sprint(search) != "[example.test corp.test]" {
		t.Errorf("got index %d dns %v search %v", idx, dns, search)
	}
	for name, b := range map[string][]byte{
		"short":           msg[:10],
		"not IPv6":        append([]byte{unix.AF_INET}, msg[1:]...),
		"not an RA":       append(append(append([]byte{}, msg[:8]...), 135), msg[9:]...),
		"truncated":       msg[:len(msg)-8],
		"zero length opt": ndMsg(7, []byte{25, 0, 0, 0, 0, 0, 0, 0}),
	} {
		if _, _, _, err := parseNDUserOpt(b); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func FuzzParseNDUserOpt(f *testing.F) {
	f.Add(ndMsg(2, rdnss(600, "2001:db8::53"), dnssl(600, "example.test")))
	f.Add(ndMsg(2, dnssl(60, "a.b.c", "d")))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, dns, search, _ := parseNDUserOpt(b)
		for _, d := range dns {
			if !d.Is6() || d.IsUnspecified() || d.IsMulticast() {
				t.Fatalf("unusable DNS server %v", d)
			}
		}
		for _, s := range search {
			if !validDomain(s) {
				t.Fatalf("unsafe search domain %q", s)
			}
		}
	})
}

func TestValidDomain(t *testing.T) {
	for _, ok := range []string{"example.test", "a", "x-1.y_2.z.", "db7"} {
		if !validDomain(ok) {
			t.Errorf("%q refused", ok)
		}
	}
	for _, bad := range []string{"", ".", "a..b", "a b", "a\nnameserver 1.1.1.1", "a/b", strings.Repeat("a", 64) + ".test", strings.Repeat("a.", 127) + "ab"} {
		if validDomain(bad) {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestResolvConfAndRestore(t *testing.T) {
	p := filepath.Join(t.TempDir(), "etc", "resolv.conf")
	b, err := backupFile(p)
	if err != nil {
		t.Fatal(err)
	}
	dns := []netip.Addr{netip.MustParseAddr("10.0.0.53"), netip.MustParseAddr("2001:db8::53")}
	if err := writeResolvConf(p, dns, []string{"example.test", "corp.test"}); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(p)
	want := "# written by unlockrd's network stage\nnameserver 10.0.0.53\nnameserver 2001:db8::53\nsearch example.test corp.test\n"
	if string(got) != want {
		t.Errorf("resolv.conf:\n%s\nwant:\n%s", got, want)
	}
	if err := b.restore(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Errorf("restore left the file that did not exist before: %v", err)
	}
}

func TestTrimCtx(t *testing.T) {
	err := fmt.Errorf("DHCPv4: no lease after 2 message(s) in 1.0s (no answer): %w", context.Canceled)
	if got := trimCtx(err); got != "DHCPv4: no lease after 2 message(s) in 1.0s (no answer)" {
		t.Errorf("got %q", got)
	}
	if got := trimCtx(errors.New("plain")); got != "plain" {
		t.Errorf("got %q", got)
	}
}

func TestResultString(t *testing.T) {
	r := &Result{Link: "eth0", Method: "dhcp+auto6", Addrs: []netip.Prefix{netip.MustParsePrefix("10.0.2.15/24"), netip.MustParsePrefix("fec0::5054:ff:fe12:3456/64")}}
	if s := r.String(); s != "eth0 10.0.2.15/24, fec0::5054:ff:fe12:3456/64 via dhcp+auto6" {
		t.Errorf("got %q", s)
	}
	if s := (&Result{Method: "none"}).String(); s != "no link configured (ip=none)" {
		t.Errorf("got %q", s)
	}
	if err := (*Result)(nil).Teardown(); err != nil {
		t.Errorf("nil Teardown: %v", err)
	}
}

func TestRouterSolicitationFrame(t *testing.T) {
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56}
	f := rsFrame(mac)
	if len(f) != 62 || !bytes.Equal(f[0:6], []byte{0x33, 0x33, 0, 0, 0, 2}) || !bytes.Equal(f[6:12], mac) ||
		binary.BigEndian.Uint16(f[12:14]) != 0x86dd {
		t.Fatalf("Ethernet header % x", f[:14])
	}
	ip := f[14:54]
	if ip[0]>>4 != 6 || binary.BigEndian.Uint16(ip[4:6]) != 8 || ip[6] != 58 || ip[7] != 255 ||
		netip.AddrFrom16([16]byte(ip[8:24])) != netip.IPv6Unspecified() ||
		netip.AddrFrom16([16]byte(ip[24:40])) != netip.MustParseAddr("ff02::2") {
		t.Fatalf("IPv6 header % x", ip)
	}
	if f[54] != 133 || f[55] != 0 {
		t.Fatalf("ICMPv6 type/code %d/%d", f[54], f[55])
	}
	// The one's complement sum over pseudo-header and message, checksum
	// included, is all ones.
	var sum uint32
	for i := 8; i < 40; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	sum += 8 + 58
	for i := 54; i < 62; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(f[i:]))
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	if sum != 0xffff {
		t.Errorf("ICMPv6 checksum does not verify (sum %#x)", sum)
	}
}
