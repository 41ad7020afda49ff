package config_test

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/initramfs/config"
	"github.com/unlockrd/unlockrd/initramfs/host/yamlconfig"
)

// network.ip is validated at build time by the parser the initramfs runs.
func TestNetworkIPValidatedAtBuildTime(t *testing.T) {
	for _, ok := range []string{
		"  ip: eth0:auto6",
		"  ip: [eth0:dhcp, eth0:auto6]",
		"  ip: 10.0.0.2::10.0.0.1:255.255.255.0:db1:eth0:none:10.0.0.53",
		"  ip: none",
	} {
		if _, err := yamlconfig.Parse([]byte(strings.Replace(good, "  ip: dhcp", ok, 1))); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	for _, tc := range []struct{ yaml, msg string }{
		{"  ip: eth0:dhcpp", `method: "dhcpp" is not one of`},
		{"  ip: 10.0.0.300:::24::eth0:none", `client address: "10.0.0.300"`},
		{"  ip: [dhcp, eth1:dhcp]", "applies to every link"},
		{"  ip: [eth0:dhcp, 10.0.0.2:::24::eth0:none]", "conflicting values for eth0"},
	} {
		_, err := yamlconfig.Parse([]byte(strings.Replace(good, "  ip: dhcp", tc.yaml, 1)))
		var fe *config.FieldError
		if !errors.As(err, &fe) || fe.Field != "network.ip" || !strings.Contains(fe.Msg, tc.msg) {
			t.Errorf("%s: %v, want a network.ip error containing %q", tc.yaml, err, tc.msg)
		}
	}
}

// A bad ip= or nameserver= on the command line is reported, naming the
// parameter, and the configured value is kept.
func TestCmdlineIPAndNameserver(t *testing.T) {
	c, err := yamlconfig.Parse([]byte(strings.Replace(good, "  ip: dhcp", "  ip: eth0:dhcp", 1)))
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.ApplyCmdline("ip=eth1:dhcp ip=10.0.0.2:::24::eth1:none nameserver=10.0.0.53 nameserver=dns.example nameserver=[2001:db8::53]")
	if err == nil {
		t.Fatal("no error for conflicting ip= values and a bad nameserver=")
	}
	for _, want := range []string{"ip=eth1:dhcp 10.0.0.2:::24::eth1:none: conflicting values for eth1", `nameserver=dns.example: "dns.example" is not an IP address`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if !slices.Equal(c.Network.IP.Values, []string{"eth0:dhcp"}) {
		t.Errorf("network.ip = %q, want the configured eth0:dhcp kept", c.Network.IP.Values)
	}
	if !slices.Equal(c.Boot.Nameservers, []netip.Addr{netip.MustParseAddr("10.0.0.53"), netip.MustParseAddr("2001:db8::53")}) {
		t.Errorf("nameservers = %q", c.Boot.Nameservers)
	}
	if _, err := c.ApplyCmdline("ip=eth1:dhcp ip=eth1:auto6"); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.Network.IP.Values, []string{"eth1:dhcp", "eth1:auto6"}) {
		t.Errorf("network.ip = %q after good ip= values", c.Network.IP.Values)
	}
}
