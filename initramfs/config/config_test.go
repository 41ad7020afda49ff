package config_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/config"
	"github.com/unlockrd/unlockrd/initramfs/host/yamlconfig"
)

const goodPin = "sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y="

const good = `
key:
  urls:
    - https://keys-a.example.net:8443/v1/keys/{host}
    - https://10.0.2.2:8443/v1/keys/{host}
  pins:
    - ` + goodPin + `
  host: smbios-uuid
  token: credential
  attempt_timeout: 5s
  give_up_after: 0
network:
  ip: dhcp
  keep: false
root:
  device: PARTLABEL=root
  fstype: ext4
  options: [ro]
volumes:
  - name: data
    device: PARTLABEL=data
    mount: /var/lib/postgresql
    fstype: ext4
    options: [noatime]
  - name: swap
    device: PARTLABEL=swap
    swap: true
modules: [virtio_pci, virtio-blk, virtio_net, dm_crypt, ext4]
`

func TestParseGood(t *testing.T) {
	c, err := yamlconfig.Parse([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if c.Key.AttemptTimeout.D() != 5*time.Second {
		t.Errorf("attempt_timeout = %s", c.Key.AttemptTimeout)
	}
	if got := strings.Join(c.Modules, " "); got != "virtio_pci virtio_blk virtio_net dm_crypt ext4" {
		t.Errorf("modules normalized to %q", got)
	}
	if len(c.Volumes) != 2 || !c.Volumes[1].Swap.On() || c.Volumes[0].Mount != "/var/lib/postgresql" {
		t.Errorf("volumes = %+v", c.Volumes)
	}
	// The embedded form round-trips.
	b, err := c.Embed()
	if err != nil {
		t.Fatal(err)
	}
	c2, err := config.LoadEmbedded(b)
	if err != nil {
		t.Fatal(err)
	}
	if c2.Key.AttemptTimeout != c.Key.AttemptTimeout || c2.Volumes[0].Name != "data" || c2.Key.Pins[0].String() != goodPin {
		t.Errorf("round trip lost data: %+v", c2)
	}
}

func TestParseErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct {
		name, from, to, field string
	}{
		{"unknown top key", "network:\n", "netwrok:\n", "netwrok"},
		{"unknown nested key", "  keep: false", "  kep: false", "network.kep"},
		{"unknown volume key", "    swap: true", "    swapp: true", "volumes[1].swapp"},
		{"malformed pin", goodPin, "sha256//nope", "key.pins[0]"},
		{"pin without prefix", goodPin, "7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y=", "key.pins[0]"},
		{"http url", "https://keys-a", "http://keys-a", "key.urls[0]"},
		{"url port out of range", "https://keys-a.example.net:8443", "https://keys-a.example.net:84430", "key.urls[0]: URL"},
		{"host id in the url's host", "https://keys-a.example.net:8443", "https://{host}.example.net:8443", "key.urls[0]: URL"},
		{"missing root", "  device: PARTLABEL=root\n", "", "root.device"},
		{"bad device ref", "device: PARTLABEL=data", "device: FOO=data", "volumes[0].device"},
		{"bad uuid", "device: PARTLABEL=data", "device: UUID=xyz", "volumes[0].device"},
		{"relative mount", "/var/lib/postgresql", "var/lib/postgresql", "volumes[0].mount"},
		{"missing mount", "    mount: /var/lib/postgresql\n", "", "volumes[0].mount"},
		{"duplicate name", "name: swap", "name: data", "volumes[1].name"},
		{"bad duration", "5s", "5 parsecs", "attempt_timeout"},
		{"literal token", "token: credential", "token: hunter2", "key.token"},
		{"bad module", "dm_crypt,", "dm crypt,", "modules[3]"},
		{"provision by label", "    options: [noatime]\n", "    options: [noatime]\n    provision: true\n", "no error"},
		{"provision on random swap", "    swap: true", "    swap: random\n    provision: true", "volumes[1].provision"},
		{"provision other fs", "    fstype: ext4\n    options: [noatime]", "    fstype: xfs\n    provision: true", "volumes[0].fstype"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := strings.Replace(good, tc.from, tc.to, 1)
			if in == good {
				t.Fatalf("test case did not change the input")
			}
			c, err := yamlconfig.Parse([]byte(in))
			if tc.field == "no error" {
				if err != nil || !c.Volumes[0].Provision || !c.NeedsMkfs() {
					t.Fatalf("%v (provision %v)", err, c != nil && c.Volumes[0].Provision)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error")
			}
			if !strings.Contains(err.Error(), tc.field) {
				t.Errorf("error %q does not name %q", err, tc.field)
			}
		})
	}
}

func TestProvisionNeedsExactPartition(t *testing.T) {
	in := strings.Replace(good, "    device: PARTLABEL=data\n", "    device: /dev/vdb\n    provision: true\n", 1)
	_, err := yamlconfig.Parse([]byte(in))
	if err == nil || !strings.Contains(err.Error(), "volumes[0].device") {
		t.Fatalf("provision on /dev/vdb: %v", err)
	}
}

func TestFieldErrorType(t *testing.T) {
	_, err := yamlconfig.Parse([]byte(strings.Replace(good, goodPin, "sha256//x", 1)))
	var fe *config.FieldError
	if !errors.As(err, &fe) || fe.Field != "key.pins[0]" {
		t.Fatalf("err = %v, want a config.FieldError for key.pins[0]", err)
	}
}

func TestLoadEmbeddedRejectsUnknown(t *testing.T) {
	if _, err := config.LoadEmbedded([]byte(`{"key":{},"extra":1}`)); err == nil {
		t.Fatal("unknown field accepted")
	}
}

func TestApplyCmdline(t *testing.T) {
	c, err := yamlconfig.Parse([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	warnings, err := c.ApplyCmdline(`console=ttyS0 root=PARTLABEL=other rw ip=eth0:dhcp ip=eth1:dhcp ` +
		`rd.unlockrd.url=https://10.0.2.2:9443/k/{host} rd.unlockrd.pin=` + goodPin +
		` rd.unlockrd.host=vm-7 rd.unlockrd.token=s3cret rd.unlockrd.keep-network init=/bin/sh "rootflags=data=ordered"`)
	if err != nil {
		t.Fatal(err)
	}
	if c.Root.Device != "PARTLABEL=other" || c.Boot.Init != "/bin/sh" || !c.Network.Keep {
		t.Errorf("overrides not applied: %+v %+v", c.Root, c.Boot)
	}
	if got := strings.Join(c.Root.Options, ","); got != "data=ordered,rw" {
		t.Errorf("root options = %q", got)
	}
	if len(c.Network.IP.Values) != 2 || c.Network.IP.Values[1] != "eth1:dhcp" || len(c.Network.IP.Plan.Links) != 2 {
		t.Errorf("ip = %v", c.Network.IP)
	}
	if len(c.Key.URLs) != 1 || c.Key.URLs[0] != "https://10.0.2.2:9443/k/{host}" {
		t.Errorf("urls = %v", c.Key.URLs)
	}
	if c.Boot.Host != "vm-7" || c.Boot.Token != "s3cret" {
		t.Errorf("host/token = %q/%q", c.Boot.Host, c.Boot.Token)
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "/proc/cmdline") {
		t.Errorf("no warning for the command-line token: %v", warnings)
	}
}

func TestApplyCmdlineBadValuesKeepConfig(t *testing.T) {
	c, err := yamlconfig.Parse([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.ApplyCmdline("rd.unlockrd.pin=sha256//bad rd.unlockrd.url=http://x/ root=NOPE=1 rd.unlockrd.bogus=1")
	if err == nil {
		t.Fatal("no error for bad parameters")
	}
	for _, want := range []string{"rd.unlockrd.pin", "rd.unlockrd.url", "root", "rd.unlockrd.bogus"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	if c.Key.Pins[0].String() != goodPin || c.Root.Device != "PARTLABEL=root" || len(c.Key.URLs) != 2 {
		t.Errorf("bad overrides were applied: %+v", c.Key)
	}
}

func TestSplitCmdlineQuotes(t *testing.T) {
	ps := config.SplitCmdline(`a=1 "b=two words" c`)
	if len(ps) != 3 || ps[1].Key != "b" || ps[1].Value != "two words" || ps[2].HasValue {
		t.Fatalf("got %+v", ps)
	}
}

func TestSwapModesAndVolumeOptions(t *testing.T) {
	cfg := strings.Replace(good, "    swap: true\n", "    swap: random\n    allow_discards: true\n    no_workqueue: false\n", 1)
	c, err := yamlconfig.Parse([]byte(cfg))
	if err != nil {
		t.Fatal(err)
	}
	v := c.Volumes[1]
	if v.Swap != config.SwapRandom || !v.AllowDiscards || v.WorkqueueBypass() || !c.Volumes[0].WorkqueueBypass() {
		t.Fatalf("volume = %+v", v)
	}
	b, err := c.Embed()
	if err != nil {
		t.Fatal(err)
	}
	e, err := config.LoadEmbedded(b)
	if err != nil {
		t.Fatal(err)
	}
	if e.Volumes[1].Swap != config.SwapRandom || e.Volumes[0].Swap != config.SwapOff {
		t.Fatalf("embedded round trip: %+v", e.Volumes)
	}
	// swap: true still embeds as the boolean older images carry.
	c2, _ := yamlconfig.Parse([]byte(good))
	b2, _ := c2.Embed()
	if !strings.Contains(string(b2), `"swap": true`) {
		t.Fatalf("swap: true embeds as:\n%s", b2)
	}
	for _, bad := range []struct{ from, to, field string }{
		{"    device: PARTLABEL=swap\n    swap: true\n", "    device: LABEL=swap\n    swap: random\n", "volumes[1].device"},
		{"    device: PARTLABEL=swap\n    swap: true\n", "    device: /dev/vda3\n    swap: random\n", "volumes[1].device"},
		{"    swap: true\n", "    swap: maybe\n", "volumes[1].swap"},
	} {
		_, err := yamlconfig.Parse([]byte(strings.Replace(good, bad.from, bad.to, 1)))
		var fe *config.FieldError
		if !errors.As(err, &fe) || fe.Field != bad.field {
			t.Errorf("%q: err = %v, want a %s error", bad.to, err, bad.field)
		}
	}
}

func TestDeviceTimeoutParameter(t *testing.T) {
	c, _ := yamlconfig.Parse([]byte(good))
	if _, err := c.ApplyCmdline("rd.unlockrd.device-timeout=15s"); err != nil || c.Boot.DeviceTimeout != 15*time.Second {
		t.Fatalf("device-timeout = %s, err %v", c.Boot.DeviceTimeout, err)
	}
	if _, err := c.ApplyCmdline("rd.unlockrd.device-timeout=soon"); err == nil || c.Boot.DeviceTimeout != 15*time.Second {
		t.Fatalf("bad value accepted: %s, err %v", c.Boot.DeviceTimeout, err)
	}
}

// An image's JSON as the builder wrote it before the leaves were typed
// still loads, into typed values, and is written back the same.
func TestEmbeddedTypedLeavesCompatible(t *testing.T) {
	const old = `{
  "key": {
    "urls": ["https://10.0.2.2:8443/v1/keys/{host}"],
    "pins": ["` + goodPin + `"],
    "host": "cmdline",
    "token": "file:/etc/unlockrd/token",
    "attempt_timeout": "10s",
    "give_up_after": "0s"
  },
  "network": {"ip": ["eth0:dhcp", "eth0:auto6"], "keep": false},
  "root": {"device": "PARTLABEL=root"},
  "volumes": null,
  "modules": null
}`
	c, err := config.LoadEmbedded([]byte(old))
	if err != nil {
		t.Fatal(err)
	}
	if c.Key.Pins[0].String() != goodPin || c.Key.Host.From != config.SourceCmdline ||
		c.Key.Token.From != config.SourceFile || c.Key.Token.Path != "/etc/unlockrd/token" {
		t.Errorf("key = %+v", c.Key)
	}
	if len(c.Network.IP.Plan.Links) != 1 || c.Network.IP.Plan.Links[0].Methods.String() != "dhcp+auto6" {
		t.Errorf("ip plan = %+v", c.Network.IP.Plan)
	}
	b, err := c.Embed()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"pins": [` + "\n" + `      "` + goodPin + `"`, `"host": "cmdline"`, `"token": "file:/etc/unlockrd/token"`, `"eth0:auto6"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("embedded form lacks %s:\n%s", want, b)
		}
	}
	// An unset token is left out, as before; an unset host is the UUID.
	c.Key.Token = config.TokenSource{}
	c.Key.Host = config.HostSource{}
	c.Normalize()
	b, _ = c.Embed()
	if strings.Contains(string(b), `"token"`) || !strings.Contains(string(b), `"host": "smbios-uuid"`) {
		t.Errorf("unset token/host embed as:\n%s", b)
	}
}

// LoadEmbedded validates: the init acts on nothing the builder would
// have refused.
func TestLoadEmbeddedValidates(t *testing.T) {
	for _, tc := range []struct{ json, want string }{
		{`{"key":{"urls":[],"pins":["` + goodPin + `"]},"root":{"device":"PARTLABEL=root"}}`, "key.urls"},
		{`{"key":{"urls":["https://k/{host}"],"pins":["sha256//x"]},"root":{"device":"PARTLABEL=root"}}`, "malformed pin"},
		{`{"key":{"urls":["https://k/{host}"],"pins":["` + goodPin + `"],"token":"hunter2"},"root":{"device":"PARTLABEL=root"}}`, "literal token"},
		{`{"key":{"urls":["https://k/{host}"],"pins":["` + goodPin + `"]},"network":{"ip":["eth0:dhcpp"]},"root":{"device":"PARTLABEL=root"}}`, "network.ip"},
		{`{"key":{"urls":["https://k/{host}"],"pins":["` + goodPin + `"]},"root":{"device":"NOPE=1"}}`, "root.device"},
	} {
		_, err := config.LoadEmbedded([]byte(tc.json))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", tc.json, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "hunter2") {
			t.Errorf("the error quotes what may be a token: %v", err)
		}
	}
}

func TestNeedsHost(t *testing.T) {
	if (config.Key{URLs: []string{"https://a/v1/key", "https://b/k"}}).NeedsHost() {
		t.Error("no {host}, but a host id is needed")
	}
	if !(config.Key{URLs: []string{"https://a/v1/key", "https://b/k/{host}"}}).NeedsHost() {
		t.Error("{host} in a URL, but no host id needed")
	}
}
