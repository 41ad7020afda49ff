// Package ipconf parses the kernel's ip= and nameserver= parameters in
// their dracut/klibc forms (DESIGN §4) into a Plan: which links to
// configure, and how.
//
// It is pure (no netlink, no system calls) so that the image builder
// validates network.ip with exactly the parser the initramfs runs, without
// importing boot code.
package ipconf

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Method is a set of ways a link gets its addresses.
type Method uint8

// The methods. A link may combine several (dual stack): "ip=dhcp
// ip=auto6" gives every link both.
const (
	DHCP   Method = 1 << iota // DHCPv4: dhcp, on, any
	DHCP6                     // dhcp6
	Auto6                     // auto6: SLAAC from router advertisements
	Static                    // the full form with autoconf none/off
)

var methodNames = []struct {
	m    Method
	name string
}{{DHCP, "dhcp"}, {DHCP6, "dhcp6"}, {Auto6, "auto6"}, {Static, "static"}}

// String joins the method names with "+", e.g. "dhcp+auto6".
func (m Method) String() string {
	var parts []string
	for _, n := range methodNames {
		if m&n.m != 0 {
			parts = append(parts, n.name)
		}
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, "+")
}

// Selector names the links an ip= value applies to: one link by name, one
// by MAC address, or (zero value) every Ethernet link.
type Selector struct {
	Name string
	MAC  net.HardwareAddr
}

// All reports whether the selector matches every Ethernet link.
func (s Selector) All() bool { return s.Name == "" && s.MAC == nil }

// Matches reports whether a link with this name and MAC is selected.
func (s Selector) Matches(name string, mac net.HardwareAddr) bool {
	switch {
	case s.Name != "":
		return s.Name == name
	case s.MAC != nil:
		return slices.Equal(s.MAC, mac)
	}
	return true
}

func (s Selector) String() string {
	switch {
	case s.Name != "":
		return s.Name
	case s.MAC != nil:
		return s.MAC.String()
	}
	return "every Ethernet link"
}

func (s Selector) equal(o Selector) bool {
	return s.Name == o.Name && slices.Equal(s.MAC, o.MAC)
}

// field renders the selector as the device field of an ip= value.
func (s Selector) field() string {
	switch {
	case s.Name != "":
		return s.Name
	case s.MAC != nil:
		return strings.ReplaceAll(s.MAC.String(), ":", "-")
	}
	return ""
}

// Address is a static address and its default gateway (invalid when none).
type Address struct {
	Prefix  netip.Prefix
	Gateway netip.Addr
}

// Link says how the links one selector matches are configured.
type Link struct {
	Select Selector
	// Off is <dev>:none: the link is left alone.
	Off bool
	// Methods is never 0 unless Off.
	Methods Method
	// Static holds at most one address per family (Methods has Static).
	Static   []Address
	Hostname string
	DNS      []netip.Addr
	// MTU, when non-zero, is set on the link before it comes up.
	MTU int
	// MAC, when non-nil, replaces the link's address before it comes up.
	MAC net.HardwareAddr
	// Values are the ip= values merged into this link, for messages.
	Values []string
}

// Plan is the whole network configuration the command line asks for.
type Plan struct {
	// None is ip=none/off: no link is configured.
	None  bool
	Links []Link
}

// Default is the plan without any ip=: DHCPv4 on every Ethernet link.
func Default() Plan {
	return Plan{Links: []Link{{Methods: DHCP, Values: []string{"dhcp"}}}}
}

// Error is a bad ip= or nameserver= value. It names the parameter, the
// value and the part of it that is wrong.
type Error struct {
	Param string // "ip" or "nameserver"
	Value string // the value (several, space-separated, for conflicts)
	Part  string // e.g. "netmask", "device"; empty for the whole value
	Msg   string
}

func (e *Error) Error() string {
	if e.Part == "" {
		return fmt.Sprintf("%s=%s: %s", e.Param, e.Value, e.Msg)
	}
	return fmt.Sprintf("%s=%s: %s: %s", e.Param, e.Value, e.Part, e.Msg)
}

type partErr struct{ part, msg string }

func (e *partErr) Error() string { return e.part + ": " + e.msg }

func bad(part, format string, a ...any) error {
	return &partErr{part: part, msg: fmt.Sprintf(format, a...)}
}

// Parse parses every ip= value of the command line (or network.ip) into a
// plan. No values give Default. Values that contradict each other (two
// static IPv4 addresses for one link, DHCPv4 and a static IPv4 address, a
// value for every link beside values for named links, ip=none beside
// anything) are an error naming them.
func Parse(values []string) (Plan, error) {
	if len(values) == 0 {
		return Default(), nil
	}
	var p Plan
	var noneVal string
	for _, v := range values {
		l, err := ParseValue(v)
		if err != nil {
			return Plan{}, err
		}
		if l.Select.All() && l.Off {
			p.None, noneVal = true, v
			continue
		}
		i := slices.IndexFunc(p.Links, func(o Link) bool { return o.Select.equal(l.Select) })
		if i < 0 {
			p.Links = append(p.Links, l)
			continue
		}
		if err := p.Links[i].merge(l); err != nil {
			return Plan{}, &Error{Param: "ip", Value: strings.Join(append(slices.Clone(p.Links[i].Values), v), " "), Msg: err.Error()}
		}
	}
	if p.None {
		if len(p.Links) > 0 {
			return Plan{}, &Error{Param: "ip", Value: noneVal + " " + p.Links[0].Values[0],
				Msg: "ip=" + noneVal + " turns the network off, but ip=" + p.Links[0].Values[0] + " configures it"}
		}
		return Plan{None: true}, nil
	}
	var all, named *Link
	for i := range p.Links {
		if p.Links[i].Select.All() {
			all = &p.Links[i]
		} else if named == nil {
			named = &p.Links[i]
		}
	}
	if all != nil && named != nil {
		return Plan{}, &Error{Param: "ip", Value: all.Values[0] + " " + named.Values[0],
			Msg: "ip=" + all.Values[0] + " applies to every link and cannot be combined with ip=" + named.Values[0] + " for " + named.Select.String() + "; name the link in each value"}
	}
	return p, nil
}

// merge adds o (same selector) to l.
func (l *Link) merge(o Link) error {
	who := l.Select.String()
	if l.Off || o.Off {
		if l.Off && o.Off {
			l.Values = append(l.Values, o.Values...)
			return nil
		}
		return fmt.Errorf("conflicting values for %s: none and %s", who, (l.Methods | o.Methods).String())
	}
	for _, a := range o.Static {
		i := slices.IndexFunc(l.Static, func(b Address) bool { return b.Prefix.Addr().Is4() == a.Prefix.Addr().Is4() })
		if i >= 0 {
			if l.Static[i] != a {
				return fmt.Errorf("conflicting values for %s: two static %s addresses (%s and %s)", who, family(a.Prefix.Addr()), l.Static[i].Prefix, a.Prefix)
			}
			continue
		}
		l.Static = append(l.Static, a)
	}
	l.Methods |= o.Methods
	for _, a := range l.Static {
		if a.Prefix.Addr().Is4() && l.Methods&DHCP != 0 {
			return fmt.Errorf("conflicting values for %s: DHCPv4 and the static IPv4 address %s", who, a.Prefix)
		}
		if a.Prefix.Addr().Is6() && l.Methods&(DHCP6|Auto6) != 0 {
			return fmt.Errorf("conflicting values for %s: %s and the static IPv6 address %s", who, (l.Methods & (DHCP6 | Auto6)).String(), a.Prefix)
		}
	}
	if o.Hostname != "" {
		if l.Hostname != "" && l.Hostname != o.Hostname {
			return fmt.Errorf("conflicting values for %s: host names %s and %s", who, l.Hostname, o.Hostname)
		}
		l.Hostname = o.Hostname
	}
	if o.MTU != 0 {
		if l.MTU != 0 && l.MTU != o.MTU {
			return fmt.Errorf("conflicting values for %s: MTU %d and %d", who, l.MTU, o.MTU)
		}
		l.MTU = o.MTU
	}
	if o.MAC != nil {
		if l.MAC != nil && !slices.Equal(l.MAC, o.MAC) {
			return fmt.Errorf("conflicting values for %s: MAC addresses %s and %s", who, l.MAC, o.MAC)
		}
		l.MAC = o.MAC
	}
	for _, d := range o.DNS {
		if !slices.Contains(l.DNS, d) {
			l.DNS = append(l.DNS, d)
		}
	}
	l.Values = append(l.Values, o.Values...)
	return nil
}

func family(a netip.Addr) string {
	if a.Is4() {
		return "IPv4"
	}
	return "IPv6"
}

// ParseValue parses one ip= value. ip=none and ip=off give a Link that
// selects every link and is Off.
func ParseValue(v string) (Link, error) {
	l, err := parseValue(v)
	if err != nil {
		pe, ok := err.(*partErr)
		if !ok {
			return Link{}, &Error{Param: "ip", Value: v, Msg: err.Error()}
		}
		return Link{}, &Error{Param: "ip", Value: v, Part: pe.part, Msg: pe.msg}
	}
	l.Values = []string{v}
	return l, nil
}

const forms = "dhcp, on, any, dhcp6, auto6, none, off, <dev>:<method>[:<mtu>[:<mac>]] or " +
	"<client>:<server>:<gw>:<netmask>:<hostname>:<dev>:<autoconf>[:<dns0>[:<dns1>]]"

func parseValue(v string) (Link, error) {
	if v == "" {
		return Link{}, bad("value", "empty")
	}
	f, err := splitFields(v)
	if err != nil {
		return Link{}, err
	}
	if len(f) == 1 {
		m, off, err := parseMethod("method", f[0])
		if err != nil {
			return Link{}, bad("method", "%q is not a known form (want %s)", f[0], forms)
		}
		return Link{Methods: m, Off: off}, nil
	}
	if _, _, err := parseMethod("", f[1]); err == nil {
		return parseDevForm(f)
	}
	if len(f) >= 7 {
		return parseFullForm(f)
	}
	if f[1] != "" && strings.Trim(f[1], "abcdefghijklmnopqrstuvwxyz0123456789-") == "" {
		_, _, err := parseMethod("method", f[1])
		return Link{}, err
	}
	return Link{}, bad("value", "%d colon-separated fields fit no form (want %s)", len(f), forms)
}

// splitFields splits on colons outside square brackets, which enclose
// IPv6 and MAC addresses.
func splitFields(v string) ([]string, error) {
	var out []string
	start, depth := 0, 0
	for i := 0; i < len(v); i++ {
		switch v[i] {
		case '[':
			if depth > 0 {
				return nil, bad("value", "nested '[' at offset %d", i)
			}
			depth++
		case ']':
			if depth == 0 {
				return nil, bad("value", "']' without '[' at offset %d", i)
			}
			depth--
		case ':':
			if depth == 0 {
				out = append(out, v[start:i])
				start = i + 1
			}
		}
	}
	if depth > 0 {
		return nil, bad("value", "'[' is never closed")
	}
	return append(out, v[start:]), nil
}

// parseMethod parses an autoconf keyword; off is none/off.
func parseMethod(part, s string) (m Method, off bool, err error) {
	switch s {
	case "dhcp", "on", "any":
		return DHCP, false, nil
	case "dhcp6":
		return DHCP6, false, nil
	case "auto6":
		return Auto6, false, nil
	case "none", "off":
		return 0, true, nil
	case "ibft", "bootp", "rarp", "both", "link6", "either6", "single-dhcp":
		return 0, false, bad(part, "%q is not supported by unlockrd (use dhcp, dhcp6, auto6 or none)", s)
	}
	return 0, false, bad(part, "%q is not one of dhcp, on, any, dhcp6, auto6, none, off", s)
}

// parseDevForm: <dev>:<method>[:<mtu>[:<mac>]].
func parseDevForm(f []string) (Link, error) {
	sel, err := parseDevice(f[0])
	if err != nil {
		return Link{}, err
	}
	if sel.All() {
		return Link{}, bad("device", "empty (write ip=%s alone for every link)", f[1])
	}
	m, off, _ := parseMethod("method", f[1])
	l := Link{Select: sel, Methods: m, Off: off}
	if err := parseMTUMAC(&l, f[2:]); err != nil {
		return Link{}, err
	}
	if off && (l.MTU != 0 || l.MAC != nil) {
		return Link{}, bad("method", "none leaves %s alone: an MTU or MAC address has no effect", sel)
	}
	return l, nil
}

// parseMTUMAC parses the optional [<mtu>[:<mac>]] tail; an unbracketed MAC
// address spans six fields.
func parseMTUMAC(l *Link, f []string) error {
	if len(f) == 0 {
		return nil
	}
	if f[0] != "" {
		mtu, err := strconv.Atoi(f[0])
		if err != nil || mtu < 68 || mtu > 65535 {
			return bad("mtu", "%q is not an MTU between 68 and 65535", f[0])
		}
		l.MTU = mtu
	}
	rest := f[1:]
	switch len(rest) {
	case 0:
		return nil
	case 1, 6:
		mac, err := parseMAC(strings.Join(rest, ":"))
		if err != nil {
			return bad("mac", "%v", err)
		}
		if l.Select.All() {
			return bad("mac", "setting MAC address %s needs a device: every link would get it", mac)
		}
		l.MAC = mac
		return nil
	}
	return bad("mac", "%q is not a MAC address", strings.Join(rest, ":"))
}

// parseFullForm: <client>:<server>:<gw>:<netmask>:<hostname>:<dev>:
// <autoconf>[:<dns0>[:<dns1>[:<ntp0>]]] or [:<mtu>[:<mac>]].
func parseFullForm(f []string) (Link, error) {
	var l Link
	var err error
	if l.Select, err = parseDevice(f[5]); err != nil {
		return Link{}, err
	}
	off := false
	switch f[6] {
	case "":
		// The kernel's rule: a client address means static, none means
		// autoconfiguration.
		if f[0] != "" {
			off = true
		} else {
			l.Methods = DHCP
		}
	default:
		if l.Methods, off, err = parseMethod("autoconf", f[6]); err != nil {
			return Link{}, err
		}
	}
	if f[1] != "" {
		if _, err := parseAddr("server address", f[1]); err != nil {
			return Link{}, err
		}
	}
	if f[4] != "" {
		if err := checkHostname(f[4]); err != nil {
			return Link{}, err
		}
		l.Hostname = f[4]
	}
	if !off {
		for _, p := range []struct {
			i    int
			part string
		}{{0, "client address"}, {2, "gateway"}, {3, "netmask"}} {
			if f[p.i] != "" {
				return Link{}, bad(p.part, "%q given with autoconf %s, which sets it itself (use none for a static address)", f[p.i], l.Methods)
			}
		}
	} else {
		if f[0] == "" {
			return Link{}, bad("client address", "empty, but autoconf %s needs one", nonEmpty(f[6], "(empty)"))
		}
		a, err := parseStatic(f[0], f[2], f[3])
		if err != nil {
			return Link{}, err
		}
		l.Methods = Static
		l.Static = []Address{a}
	}
	if err := parseTail(&l, f[7:]); err != nil {
		return Link{}, err
	}
	return l, nil
}

func nonEmpty(s, dflt string) string {
	if s == "" {
		return dflt
	}
	return s
}

// parseTail parses what follows autoconf: DNS servers (and an NTP server,
// ignored) or an MTU and MAC address, told apart as dracut does.
func parseTail(l *Link, f []string) error {
	if len(f) == 0 {
		return nil
	}
	looksIP := func(s string) bool { _, err := parseAddr("", s); return err == nil }
	isMTU := f[0] != "" && strings.Trim(f[0], "0123456789") == ""
	switch {
	case isMTU:
		return parseMTUMAC(l, f)
	case f[0] == "" && len(f) >= 2 && !looksIP(f[1]):
		return parseMTUMAC(l, f)
	}
	if len(f) > 3 {
		return bad("dns", "%d fields after autoconf: want <dns0>:<dns1>[:<ntp0>] or <mtu>:<mac>", len(f))
	}
	parts := []string{"dns0", "dns1", "ntp0"}
	for i, s := range f {
		if s == "" {
			continue
		}
		a, err := parseAddr(parts[i], s)
		if err != nil {
			return err
		}
		if i < 2 && !slices.Contains(l.DNS, a) {
			l.DNS = append(l.DNS, a)
		}
	}
	return nil
}

// parseStatic parses client, gateway and netmask of a static address.
func parseStatic(client, gw, mask string) (Address, error) {
	c, bits := client, -1
	if i := strings.LastIndexByte(client, '/'); i >= 0 && !strings.Contains(client[i:], "]") {
		c = client[:i]
		n, err := strconv.Atoi(client[i+1:])
		if err != nil || n < 0 || strings.Trim(client[i+1:], "0123456789") != "" {
			return Address{}, bad("client address", "%q: %q is not a prefix length", client, client[i+1:])
		}
		bits = n
	}
	a, err := parseAddr("client address", c)
	if err != nil {
		return Address{}, err
	}
	if a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() {
		return Address{}, bad("client address", "%q is not a unicast address", client)
	}
	max := a.BitLen()
	if mask != "" {
		n, err := parseNetmask(mask, a)
		if err != nil {
			return Address{}, err
		}
		if bits >= 0 && bits != n {
			return Address{}, bad("netmask", "%q contradicts the prefix length /%d of the client address", mask, bits)
		}
		bits = n
	}
	if bits < 0 {
		if a.Is4() {
			ones, _ := net.IP(a.AsSlice()).DefaultMask().Size()
			bits = ones
		} else {
			bits = 64
		}
	}
	if bits < 1 || bits > max {
		return Address{}, bad("netmask", "prefix length %d is out of range 1-%d", bits, max)
	}
	out := Address{Prefix: netip.PrefixFrom(a, bits)}
	if gw != "" {
		g, err := parseAddr("gateway", gw)
		if err != nil {
			return Address{}, err
		}
		if g.Is4() != a.Is4() {
			return Address{}, bad("gateway", "%s is %s but the client address is %s", g, family(g), family(a))
		}
		if g.IsUnspecified() || g.IsMulticast() || g.IsLoopback() || g == a {
			return Address{}, bad("gateway", "%s cannot be a gateway", g)
		}
		out.Gateway = g
	}
	return out, nil
}

// parseNetmask takes a prefix length or (IPv4) a dotted mask.
func parseNetmask(s string, client netip.Addr) (int, error) {
	if strings.Trim(s, "0123456789") == "" {
		n, err := strconv.Atoi(s)
		if err != nil || n > client.BitLen() {
			return 0, bad("netmask", "%q is not a prefix length 1-%d", s, client.BitLen())
		}
		return n, nil
	}
	m, err := netip.ParseAddr(s)
	if err != nil || !m.Is4() {
		return 0, bad("netmask", "%q is neither a prefix length nor a dotted IPv4 netmask", s)
	}
	if client.Is6() {
		return 0, bad("netmask", "%q is a dotted netmask, but an IPv6 address needs a prefix length", s)
	}
	ones, bits := net.IPMask(m.AsSlice()).Size()
	if bits == 0 {
		return 0, bad("netmask", "%q is not a contiguous netmask", s)
	}
	return ones, nil
}

// parseAddr parses an IPv4 address, or an IPv6 address in brackets.
func parseAddr(part, s string) (netip.Addr, error) {
	if inner, ok := strings.CutPrefix(s, "["); ok {
		inner, ok = strings.CutSuffix(inner, "]")
		a, err := netip.ParseAddr(inner)
		if !ok || err != nil || !a.Is6() || a.Is4In6() || a.Zone() != "" {
			return netip.Addr{}, bad(part, "%q is not a bracketed IPv6 address", s)
		}
		return a, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || !a.Is4() {
		return netip.Addr{}, bad(part, "%q is not an IPv4 address or a bracketed IPv6 address", s)
	}
	return a, nil
}

// parseDevice parses a link name or a MAC address (dash-separated or in
// brackets: colons separate ip= fields). Empty selects every link.
func parseDevice(s string) (Selector, error) {
	if s == "" {
		return Selector{}, nil
	}
	if strings.HasPrefix(s, "[") || strings.Count(s, "-") == 5 && len(s) == 17 {
		mac, err := parseMAC(s)
		if err != nil {
			return Selector{}, bad("device", "%v", err)
		}
		return Selector{MAC: mac}, nil
	}
	if len(s) > 15 || s == "." || s == ".." || strings.ContainsAny(s, "/:[] \t\n") {
		return Selector{}, bad("device", "%q is not a link name (at most 15 characters, no / : or spaces) or a MAC address", s)
	}
	for _, r := range s {
		if r <= ' ' || r >= 0x7f {
			return Selector{}, bad("device", "%q is not a link name", s)
		}
	}
	return Selector{Name: s}, nil
}

// parseMAC takes aa-bb-cc-dd-ee-ff, [aa:bb:cc:dd:ee:ff] or, when a MAC
// address spans ip= fields, aa:bb:cc:dd:ee:ff.
func parseMAC(s string) (net.HardwareAddr, error) {
	in := s
	if inner, ok := strings.CutPrefix(s, "["); ok {
		if inner, ok = strings.CutSuffix(inner, "]"); !ok {
			return nil, fmt.Errorf("%q is not a MAC address", in)
		}
		s = inner
	}
	mac, err := net.ParseMAC(s)
	if err != nil || len(mac) != 6 || len(s) != 17 {
		return nil, fmt.Errorf("%q is not a 6-byte MAC address like 52-54-00-12-34-56", in)
	}
	if mac[0]&1 != 0 {
		return nil, fmt.Errorf("%q is a multicast MAC address", in)
	}
	return mac, nil
}

// checkHostname accepts what the kernel's 64-byte host name can hold, made
// of RFC 1123 labels.
func checkHostname(s string) error {
	if len(s) > 64 {
		return bad("hostname", "%q is longer than 64 characters", s)
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return bad("hostname", "%q is not a host name (labels of letters, digits and inner hyphens)", s)
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return bad("hostname", "%q is not a host name (labels of letters, digits and inner hyphens)", s)
			}
		}
	}
	return nil
}

// ParseNameservers parses nameserver= values: IPv4 or IPv6 addresses, the
// latter with or without brackets.
func ParseNameservers(values []string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, v := range values {
		a, err := ParseNameserver(v)
		if err != nil {
			return nil, err
		}
		if !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	return out, nil
}

// ParseNameserver parses one nameserver= value.
func ParseNameserver(v string) (netip.Addr, error) {
	s := v
	if inner, ok := strings.CutPrefix(s, "["); ok {
		if s, ok = strings.CutSuffix(inner, "]"); !ok {
			return netip.Addr{}, &Error{Param: "nameserver", Value: v, Msg: "'[' is never closed"}
		}
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" || a.Is4In6() {
		return netip.Addr{}, &Error{Param: "nameserver", Value: v, Msg: fmt.Sprintf("%q is not an IP address", v)}
	}
	if a.IsUnspecified() || a.IsMulticast() {
		return netip.Addr{}, &Error{Param: "nameserver", Value: v, Msg: fmt.Sprintf("%s cannot be a name server", a)}
	}
	return a, nil
}

// Format renders the plan as ip= values that Parse turns back into the
// same plan (less Values): the canonical form, used in messages and as the
// fuzzing oracle.
func (p Plan) Format() []string {
	if p.None {
		return []string{"none"}
	}
	var out []string
	for _, l := range p.Links {
		out = append(out, l.format()...)
	}
	return out
}

func (l Link) format() []string {
	dev := l.Select.field()
	if l.Off {
		if dev == "" {
			return []string{"none"}
		}
		return []string{dev + ":none"}
	}
	// full are values in the full form, short the same values as short as
	// they can be written.
	var full, short []string
	for _, a := range l.Static {
		gw := ""
		if a.Gateway.IsValid() {
			gw = addrField(a.Gateway)
		}
		v := fmt.Sprintf("%s::%s:%d:%s:%s:none", addrField(a.Prefix.Addr()), gw, a.Prefix.Bits(), l.Hostname, dev)
		full, short = append(full, v), append(short, v)
	}
	for _, n := range methodNames {
		if n.m == Static || l.Methods&n.m == 0 {
			continue
		}
		v := fmt.Sprintf("::::%s:%s:%s", l.Hostname, dev, n.name)
		full = append(full, v)
		switch {
		case l.Hostname != "":
			short = append(short, v)
		case dev != "":
			short = append(short, dev+":"+n.name)
		default:
			short = append(short, n.name)
		}
	}
	// DNS servers, MTU and MAC address ride on copies of the first value:
	// identical values merge.
	out := short
	for i := 0; i < len(l.DNS); i += 2 {
		v := full[0] + ":" + addrField(l.DNS[i])
		if i+1 < len(l.DNS) {
			v += ":" + addrField(l.DNS[i+1])
		}
		out = append(out, v)
	}
	if l.MTU != 0 || l.MAC != nil {
		v := full[0] + ":"
		if l.MTU != 0 {
			v += strconv.Itoa(l.MTU)
		}
		if l.MAC != nil {
			v += ":" + strings.ReplaceAll(l.MAC.String(), ":", "-")
		}
		out = append(out, v)
	}
	return out
}

func addrField(a netip.Addr) string {
	if a.Is6() {
		return "[" + a.String() + "]"
	}
	return a.String()
}
