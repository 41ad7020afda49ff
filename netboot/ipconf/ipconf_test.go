package ipconf

import (
	"errors"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func mac(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func ip(s string) netip.Addr    { return netip.MustParseAddr(s) }

// strip drops Values, which only carry messages.
func strip(p Plan) Plan {
	for i := range p.Links {
		p.Links[i].Values = nil
	}
	return p
}

func TestParseForms(t *testing.T) {
	all := func(m Method) Plan { return Plan{Links: []Link{{Methods: m}}} }
	eth0 := Selector{Name: "eth0"}
	tests := []struct {
		name string
		in   []string
		want Plan
	}{
		{"no ip= is DHCPv4 everywhere", nil, all(DHCP)},
		{"dhcp", []string{"dhcp"}, all(DHCP)},
		{"on", []string{"on"}, all(DHCP)},
		{"any", []string{"any"}, all(DHCP)},
		{"dhcp6", []string{"dhcp6"}, all(DHCP6)},
		{"auto6", []string{"auto6"}, all(Auto6)},
		{"none", []string{"none"}, Plan{None: true}},
		{"off", []string{"off"}, Plan{None: true}},
		{"none twice", []string{"none", "off"}, Plan{None: true}},
		{"dual stack everywhere", []string{"dhcp", "auto6"}, all(DHCP | Auto6)},
		{"same method twice", []string{"dhcp", "on"}, all(DHCP)},
		{"dev:dhcp", []string{"eth0:dhcp"}, Plan{Links: []Link{{Select: eth0, Methods: DHCP}}}},
		{"dev:on", []string{"eth0:on"}, Plan{Links: []Link{{Select: eth0, Methods: DHCP}}}},
		{"dev:any", []string{"eth0:any"}, Plan{Links: []Link{{Select: eth0, Methods: DHCP}}}},
		{"dev:dhcp6", []string{"eth0:dhcp6"}, Plan{Links: []Link{{Select: eth0, Methods: DHCP6}}}},
		{"dev:auto6", []string{"eth0:auto6"}, Plan{Links: []Link{{Select: eth0, Methods: Auto6}}}},
		{"dev:none", []string{"eth0:none"}, Plan{Links: []Link{{Select: eth0, Off: true}}}},
		{"dev:off", []string{"eth0:off"}, Plan{Links: []Link{{Select: eth0, Off: true}}}},
		{"dev:dhcp:mtu", []string{"eth0:dhcp:9000"}, Plan{Links: []Link{{Select: eth0, Methods: DHCP, MTU: 9000}}}},
		{"dev:dhcp:mtu:mac dashes", []string{"eth0:dhcp:1400:52-54-00-12-34-56"},
			Plan{Links: []Link{{Select: eth0, Methods: DHCP, MTU: 1400, MAC: mac("52:54:00:12:34:56")}}}},
		{"dev:dhcp:mtu:mac colons", []string{"eth0:dhcp:1400:52:54:00:12:34:56"},
			Plan{Links: []Link{{Select: eth0, Methods: DHCP, MTU: 1400, MAC: mac("52:54:00:12:34:56")}}}},
		{"dev:dhcp::mac bracketed", []string{"eth0:dhcp::[52:54:00:12:34:56]"},
			Plan{Links: []Link{{Select: eth0, Methods: DHCP, MAC: mac("52:54:00:12:34:56")}}}},
		{"link by MAC with dashes", []string{"52-54-00-ab-cd-ef:dhcp"},
			Plan{Links: []Link{{Select: Selector{MAC: mac("52:54:00:ab:cd:ef")}, Methods: DHCP}}}},
		{"link by MAC in brackets", []string{"[52:54:00:AB:CD:EF]:auto6"},
			Plan{Links: []Link{{Select: Selector{MAC: mac("52:54:00:ab:cd:ef")}, Methods: Auto6}}}},
		{"several links", []string{"eth0:dhcp", "eth1:dhcp6"},
			Plan{Links: []Link{{Select: eth0, Methods: DHCP}, {Select: Selector{Name: "eth1"}, Methods: DHCP6}}}},
		{"one link, two families", []string{"eth0:dhcp", "eth0:auto6"},
			Plan{Links: []Link{{Select: eth0, Methods: DHCP | Auto6}}}},
		{"full static, dotted netmask", []string{"192.168.1.10::192.168.1.1:255.255.255.0:db1:eth0:none"},
			Plan{Links: []Link{{Select: eth0, Methods: Static, Hostname: "db1",
				Static: []Address{{Prefix: pfx("192.168.1.10/24"), Gateway: ip("192.168.1.1")}}}}}},
		{"full static, prefix length, off", []string{"192.168.1.10::192.168.1.1:22::eth0:off"},
			Plan{Links: []Link{{Select: eth0, Methods: Static,
				Static: []Address{{Prefix: pfx("192.168.1.10/22"), Gateway: ip("192.168.1.1")}}}}}},
		{"full static with server and DNS", []string{"10.1.2.3:10.1.2.250:10.1.2.1:255.255.255.0:h:eth0:none:10.1.2.53:10.1.2.54"},
			Plan{Links: []Link{{Select: eth0, Methods: Static, Hostname: "h",
				Static: []Address{{Prefix: pfx("10.1.2.3/24"), Gateway: ip("10.1.2.1")}},
				DNS:    []netip.Addr{ip("10.1.2.53"), ip("10.1.2.54")}}}}},
		{"full static with DNS and NTP", []string{"10.1.2.3::10.1.2.1:24::eth0:none:10.1.2.53::10.1.2.123"},
			Plan{Links: []Link{{Select: eth0, Methods: Static,
				Static: []Address{{Prefix: pfx("10.1.2.3/24"), Gateway: ip("10.1.2.1")}},
				DNS:    []netip.Addr{ip("10.1.2.53")}}}}},
		{"full static, dns1 only", []string{"10.1.2.3:::24::eth0:none::10.1.2.54"},
			Plan{Links: []Link{{Select: eth0, Methods: Static,
				Static: []Address{{Prefix: pfx("10.1.2.3/24")}},
				DNS:    []netip.Addr{ip("10.1.2.54")}}}}},
		{"full static with MTU and MAC", []string{"10.1.2.3::10.1.2.1:24::eth0:none:1500:52:54:00:00:00:01"},
			Plan{Links: []Link{{Select: eth0, Methods: Static, MTU: 1500, MAC: mac("52:54:00:00:00:01"),
				Static: []Address{{Prefix: pfx("10.1.2.3/24"), Gateway: ip("10.1.2.1")}}}}}},
		{"full static, MAC without MTU", []string{"10.1.2.3:::24::eth0:none::52-54-00-00-00-01"},
			Plan{Links: []Link{{Select: eth0, Methods: Static, MAC: mac("52:54:00:00:00:01"),
				Static: []Address{{Prefix: pfx("10.1.2.3/24")}}}}}},
		{"full static, empty autoconf with a client is static", []string{"10.1.2.3::10.1.2.1:24::eth0:"},
			Plan{Links: []Link{{Select: eth0, Methods: Static,
				Static: []Address{{Prefix: pfx("10.1.2.3/24"), Gateway: ip("10.1.2.1")}}}}}},
		{"full static, no netmask takes the class mask", []string{"10.1.2.3::10.1.2.1:::eth0:none"},
			Plan{Links: []Link{{Select: eth0, Methods: Static,
				Static: []Address{{Prefix: pfx("10.1.2.3/8"), Gateway: ip("10.1.2.1")}}}}}},
		{"full static, CIDR client", []string{"10.1.2.3/27::10.1.2.1:::eth0:none"},
			Plan{Links: []Link{{Select: eth0, Methods: Static,
				Static: []Address{{Prefix: pfx("10.1.2.3/27"), Gateway: ip("10.1.2.1")}}}}}},
		{"full static, gateway outside the subnet (on-link)", []string{"203.0.113.7::172.31.1.1:32::eth0:none"},
			Plan{Links: []Link{{Select: eth0, Methods: Static,
				Static: []Address{{Prefix: pfx("203.0.113.7/32"), Gateway: ip("172.31.1.1")}}}}}},
		{"full static on every link", []string{"10.1.2.3::10.1.2.1:24:::none"},
			Plan{Links: []Link{{Methods: Static,
				Static: []Address{{Prefix: pfx("10.1.2.3/24"), Gateway: ip("10.1.2.1")}}}}}},
		{"full static IPv6", []string{"[2001:db8::10]::[2001:db8::1]:64:h6:eth0:none:[2001:db8::53]"},
			Plan{Links: []Link{{Select: eth0, Methods: Static, Hostname: "h6",
				Static: []Address{{Prefix: pfx("2001:db8::10/64"), Gateway: ip("2001:db8::1")}},
				DNS:    []netip.Addr{ip("2001:db8::53")}}}}},
		{"full static IPv6, default /64", []string{"[fd00::5]:::::eth0:none"},
			Plan{Links: []Link{{Select: eth0, Methods: Static, Static: []Address{{Prefix: pfx("fd00::5/64")}}}}}},
		{"full static IPv6, CIDR client", []string{"[fd00::5]/56:::::eth0:none"},
			Plan{Links: []Link{{Select: eth0, Methods: Static, Static: []Address{{Prefix: pfx("fd00::5/56")}}}}}},
		{"static dual stack on one link", []string{"10.0.0.2::10.0.0.1:24::eth0:none", "[fd00::2]::[fd00::1]:64::eth0:none"},
			Plan{Links: []Link{{Select: eth0, Methods: Static, Static: []Address{
				{Prefix: pfx("10.0.0.2/24"), Gateway: ip("10.0.0.1")},
				{Prefix: pfx("fd00::2/64"), Gateway: ip("fd00::1")}}}}}},
		{"static IPv4 and SLAAC on one link", []string{"10.0.0.2::10.0.0.1:24::eth0:none", "eth0:auto6"},
			Plan{Links: []Link{{Select: eth0, Methods: Static | Auto6, Static: []Address{
				{Prefix: pfx("10.0.0.2/24"), Gateway: ip("10.0.0.1")}}}}}},
		{"identical static values merge", []string{"10.0.0.2:::24::eth0:none:10.0.0.53", "10.0.0.2:::24::eth0:none:1500"},
			Plan{Links: []Link{{Select: eth0, Methods: Static, MTU: 1500, DNS: []netip.Addr{ip("10.0.0.53")},
				Static: []Address{{Prefix: pfx("10.0.0.2/24")}}}}}},
		{"full form with dhcp: hostname and DNS", []string{"::::db1:eth0:dhcp:10.0.0.53"},
			Plan{Links: []Link{{Select: eth0, Methods: DHCP, Hostname: "db1", DNS: []netip.Addr{ip("10.0.0.53")}}}}},
		{"full form, empty autoconf without client is DHCP", []string{":::::eth0:"},
			Plan{Links: []Link{{Select: eth0, Methods: DHCP}}}},
		{"full form with dhcp6 for every link", []string{"::::::dhcp6"}, all(DHCP6)},
		{"full form, device by MAC", []string{"10.0.0.2:::24::52-54-00-00-00-09:none"},
			Plan{Links: []Link{{Select: Selector{MAC: mac("52:54:00:00:00:09")}, Methods: Static,
				Static: []Address{{Prefix: pfx("10.0.0.2/24")}}}}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(tc.in)
			if err != nil {
				t.Fatalf("Parse(%q): %v", tc.in, err)
			}
			if len(tc.in) > 0 && !got.None {
				var vals []string
				for _, l := range got.Links {
					vals = append(vals, l.Values...)
				}
				if !reflect.DeepEqual(vals, tc.in) {
					t.Errorf("Values = %q, want every input value %q", vals, tc.in)
				}
			}
			if !reflect.DeepEqual(strip(got), tc.want) {
				t.Errorf("Parse(%q)\n got  %+v\n want %+v", tc.in, strip(got), tc.want)
			}
			// The canonical form parses back to the same plan.
			again, err := Parse(got.Format())
			if err != nil {
				t.Fatalf("Parse(Format() = %q): %v", got.Format(), err)
			}
			if !reflect.DeepEqual(strip(again), strip(got)) {
				t.Errorf("Format() = %q parses to %+v", got.Format(), strip(again))
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		in   []string
		part string // Error.Part
		msg  string // substring of Error.Msg
	}{
		{[]string{""}, "value", "empty"},
		{[]string{"dhcpp"}, "method", `"dhcpp" is not a known form`},
		{[]string{"eth0:dhcpp"}, "method", `"dhcpp" is not one of`},
		{[]string{"eth0:ibft"}, "method", "not supported"},
		{[]string{"eth0:bootp"}, "method", "not supported"},
		{[]string{":dhcp"}, "device", "empty"},
		{[]string{"eth0:dhcp:1500:2:3"}, "mac", "not a MAC address"},
		{[]string{"a/b:dhcp"}, "device", "not a link name"},
		{[]string{"averyveryverylongname:dhcp"}, "device", "not a link name"},
		{[]string{"[52:54:00:12:34]:dhcp"}, "device", "6-byte MAC"},
		{[]string{"[01:00:5e:00:00:01]:dhcp"}, "device", "multicast"},
		{[]string{"eth0:dhcp:abc"}, "mtu", `"abc" is not an MTU`},
		{[]string{"eth0:dhcp:20"}, "mtu", "not an MTU"},
		{[]string{"eth0:dhcp:1500:zz-54-00-12-34-56"}, "mac", "not a 6-byte MAC"},
		{[]string{"eth0:none:1500"}, "method", "no effect"},
		{[]string{"10.0.0.300::10.0.0.1:24::eth0:none"}, "client address", `"10.0.0.300" is not an IPv4 address`},
		{[]string{"2001:db8::1::::eth0:none"}, "", ""}, // unbracketed IPv6: some part is wrong
		{[]string{"[2001:db8::1::::eth0:none"}, "value", "never closed"},
		{[]string{"]10.0.0.1::::eth0:none"}, "value", "without '['"},
		{[]string{"[[::1]]::::eth0:none"}, "value", "nested"},
		{[]string{"[10.0.0.1]:::::eth0:none"}, "client address", "not a bracketed IPv6"},
		{[]string{"0.0.0.0:::24::eth0:none"}, "client address", "not a unicast"},
		{[]string{"224.0.0.1:::24::eth0:none"}, "client address", "not a unicast"},
		{[]string{"10.0.0.2/x:::::eth0:none"}, "client address", "not a prefix length"},
		{[]string{"10.0.0.2::10.0.0.1:255.0.255.0::eth0:none"}, "netmask", "not a contiguous"},
		{[]string{"10.0.0.2::10.0.0.1:33::eth0:none"}, "netmask", "prefix length 1-32"},
		{[]string{"10.0.0.2::10.0.0.1:0::eth0:none"}, "netmask", "out of range"},
		{[]string{"10.0.0.2::10.0.0.1:mask::eth0:none"}, "netmask", "neither a prefix length"},
		{[]string{"10.0.0.2/24::10.0.0.1:16::eth0:none"}, "netmask", "contradicts"},
		{[]string{"[fd00::2]::[fd00::1]:255.255.255.0::eth0:none"}, "netmask", "needs a prefix length"},
		{[]string{"10.0.0.2::[fd00::1]:24::eth0:none"}, "gateway", "is IPv6 but the client address is IPv4"},
		{[]string{"10.0.0.2::10.0.0.2:24::eth0:none"}, "gateway", "cannot be a gateway"},
		{[]string{"10.0.0.2::10.0.0.x:24::eth0:none"}, "gateway", "not an IPv4"},
		{[]string{"10.0.0.2:nfs:10.0.0.1:24::eth0:none"}, "server address", "not an IPv4"},
		{[]string{"10.0.0.2::10.0.0.1:24:bad_host:eth0:none"}, "hostname", "not a host name"},
		{[]string{"10.0.0.2::10.0.0.1:24:-bad:eth0:none"}, "hostname", "not a host name"},
		{[]string{"10.0.0.2::10.0.0.1:24:" + strings.Repeat("a", 65) + ":eth0:none"}, "hostname", "longer than 64"},
		{[]string{"10.0.0.2::10.0.0.1:24::eth0:static"}, "autoconf", `"static" is not one of`},
		{[]string{"10.0.0.2::10.0.0.1:24::eth0:ibft"}, "autoconf", "not supported"},
		{[]string{":::24::eth0:none"}, "client address", "empty, but autoconf none needs one"},
		{[]string{"10.0.0.2:::24::eth0:dhcp"}, "client address", "given with autoconf dhcp"},
		{[]string{"::10.0.0.1:::eth0:dhcp"}, "gateway", "given with autoconf dhcp"},
		{[]string{":::24::eth0:auto6"}, "netmask", "given with autoconf auto6"},
		{[]string{"10.0.0.2:::24::eth0:none:10.0.0.999"}, "dns0", "not an IPv4"},
		{[]string{"10.0.0.2:::24::eth0:none:10.0.0.53:nope"}, "dns1", "not an IPv4"},
		{[]string{"10.0.0.2:::24::eth0:none:1.1.1.1:1.1.1.2:1.1.1.3:1.1.1.4"}, "dns", "4 fields after autoconf"},
		{[]string{"10.0.0.2:::24:::none:1500:52-54-00-12-34-56"}, "mac", "needs a device"},
		{[]string{"10.0.0.2:::24::eth0"}, "value", "6 colon-separated fields fit no form"},
		{[]string{"a:b:c"}, "method", `"b" is not one of`},
		// Conflicts between values.
		{[]string{"none", "eth0:dhcp"}, "", "turns the network off"},
		{[]string{"eth0:dhcp", "off"}, "", "turns the network off"},
		{[]string{"dhcp", "eth1:dhcp"}, "", "applies to every link and cannot be combined"},
		{[]string{"eth0:dhcp", "10.0.0.2:::24::eth0:none"}, "", "DHCPv4 and the static IPv4 address"},
		{[]string{"10.0.0.2:::24::eth0:none", "10.0.0.3:::24::eth0:none"}, "", "two static IPv4 addresses"},
		{[]string{"[fd00::2]:::64::eth0:none", "eth0:auto6"}, "", "auto6 and the static IPv6 address"},
		{[]string{"eth0:none", "eth0:dhcp"}, "", "none and dhcp"},
		{[]string{"::::a:eth0:dhcp", "::::b:eth0:auto6"}, "", "host names a and b"},
		{[]string{"eth0:dhcp:1500", "eth0:auto6:9000"}, "", "MTU 1500 and 9000"},
		{[]string{"eth0:dhcp::52-54-00-00-00-01", "eth0:auto6::52-54-00-00-00-02"}, "", "MAC addresses"},
	}
	for _, tc := range tests {
		_, err := Parse(tc.in)
		var e *Error
		if !errors.As(err, &e) {
			t.Errorf("Parse(%q) = %v, want an *Error", tc.in, err)
			continue
		}
		if e.Param != "ip" || e.Msg == "" || (tc.part != "" && e.Part != tc.part) || !strings.Contains(e.Msg, tc.msg) {
			t.Errorf("Parse(%q): %q (part %q), want part %q and %q", tc.in, e.Error(), e.Part, tc.part, tc.msg)
		}
		if !strings.HasPrefix(e.Error(), "ip=") {
			t.Errorf("Parse(%q): %q does not name the parameter first", tc.in, e.Error())
		}
		// The message names every value involved.
		for _, v := range tc.in {
			if len(tc.in) > 1 && v != "" && !strings.Contains(e.Value, v) {
				t.Errorf("Parse(%q): error %q does not name %q", tc.in, e.Error(), v)
			}
		}
		if len(tc.in) == 1 && e.Value != tc.in[0] {
			t.Errorf("Parse(%q): error names value %q", tc.in, e.Value)
		}
	}
}

func TestSelectorMatches(t *testing.T) {
	m := mac("52:54:00:00:00:07")
	if !(Selector{}).Matches("eth3", m) || !(Selector{Name: "eth3"}).Matches("eth3", nil) ||
		(Selector{Name: "eth3"}).Matches("eth4", m) || !(Selector{MAC: m}).Matches("whatever", m) ||
		(Selector{MAC: m}).Matches("eth3", mac("52:54:00:00:00:08")) {
		t.Error("selector matching is wrong")
	}
}

func TestParseNameservers(t *testing.T) {
	got, err := ParseNameservers([]string{"10.0.0.53", "2001:db8::53", "[2001:db8::54]", "10.0.0.53"})
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Addr{ip("10.0.0.53"), ip("2001:db8::53"), ip("2001:db8::54")}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	for _, bad := range []string{"", "dns.example", "10.0.0.256", "[2001:db8::1", "0.0.0.0", "ff02::1", "fe80::1%eth0"} {
		_, err := ParseNameservers([]string{"1.1.1.1", bad})
		var e *Error
		if !errors.As(err, &e) || e.Param != "nameserver" || e.Value != bad {
			t.Errorf("nameserver=%s: %v, want an error naming nameserver and the value", bad, err)
		}
	}
}

func TestMethodString(t *testing.T) {
	if s := (DHCP | Auto6).String(); s != "dhcp+auto6" {
		t.Errorf("got %q", s)
	}
	if s := Method(0).String(); s != "none" {
		t.Errorf("got %q", s)
	}
}

// FuzzParse checks that no input panics, that errors always name the
// parameter, and that every accepted plan survives Format and Parse.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"dhcp", "none", "eth0:dhcp eth1:auto6", "eth0:dhcp:1400:52:54:00:12:34:56",
		"192.168.1.10::192.168.1.1:255.255.255.0:db1:eth0:none:10.1.2.53:10.1.2.54",
		"[2001:db8::10]::[2001:db8::1]:64:h6:eth0:none:[2001:db8::53]",
		"10.0.0.2::10.0.0.1:24::eth0:none [fd00::2]::[fd00::1]:64::eth0:none eth0:dhcp6",
		"::::db1:eth0:dhcp:10.0.0.53 ::::db1:eth0:auto6", "[52:54:00:AB:CD:EF]:auto6",
		"10.1.2.3:::24::eth0:none::52-54-00-00-00-01", "10.1.2.3/27::10.1.2.1:::eth0:none",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		vals := strings.Fields(s)
		p, err := Parse(vals)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || e.Param != "ip" || e.Msg == "" {
				t.Fatalf("Parse(%q): %v is not a complete *Error", vals, err)
			}
			return
		}
		if len(vals) == 0 {
			return
		}
		for _, l := range p.Links {
			if l.Methods == 0 && !l.Off || l.Off && l.Methods != 0 {
				t.Fatalf("Parse(%q): link %+v has methods %v", vals, l, l.Methods)
			}
			if (l.Methods&Static != 0) != (len(l.Static) > 0) {
				t.Fatalf("Parse(%q): static method without addresses or the reverse: %+v", vals, l)
			}
			for _, a := range l.Static {
				if !a.Prefix.IsValid() || a.Prefix.Bits() < 1 {
					t.Fatalf("Parse(%q): bad static prefix %v", vals, a.Prefix)
				}
			}
		}
		out := p.Format()
		again, err := Parse(out)
		if err != nil {
			t.Fatalf("Parse(%q) ok, but its Format %q fails: %v", vals, out, err)
		}
		if !reflect.DeepEqual(strip(again), strip(p)) {
			t.Fatalf("Parse(%q) = %+v\nFormat = %q\nparses to %+v", vals, strip(p), out, strip(again))
		}
	})
}
