// Package config is the typed configuration of an unlockrd image
// (DESIGN §3): parsed strictly from YAML by the builder, validated at build
// time, embedded in the image as JSON, and overridden at boot by the kernel
// command line (DESIGN §4).
//
// It is shared by host-side and boot-side code, so it imports neither.
package config

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"net/url"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/unlock/keyproto"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

// Config is the whole configuration.
type Config struct {
	Key     Key      `yaml:"key" json:"key"`
	Network Network  `yaml:"network" json:"network"`
	Root    Root     `yaml:"root" json:"root"`
	Volumes []Volume `yaml:"volumes" json:"volumes"`
	Modules []string `yaml:"modules" json:"modules"`
	// NoCipherAcceleration leaves out the accelerated cipher drivers the
	// builder adds by default (aesni_intel on x86-64). Build time only.
	NoCipherAcceleration bool `yaml:"no_cipher_acceleration" json:"-"`

	// Boot holds what only the kernel command line sets.
	Boot Boot `yaml:"-" json:"-"`
}

// Key configures where and how the key is fetched (DESIGN §5).
type Key struct {
	URLs []string  `yaml:"urls" json:"urls"`
	Pins []pin.Pin `yaml:"pins" json:"pins"`
	// CA holds CA certificates (PEM) trusted for a server whose own key
	// matches no pin. Either pins or a CA is required.
	CA    CACerts     `yaml:"ca" json:"ca,omitzero"`
	Host  HostSource  `yaml:"host" json:"host"`
	Token TokenSource `yaml:"token" json:"token,omitzero"`
	// AttemptTimeout bounds one request to one server.
	AttemptTimeout Duration `yaml:"attempt_timeout" json:"attempt_timeout"`
	// GiveUpAfter is 0 to retry forever, else the host reboots after it.
	GiveUpAfter Duration `yaml:"give_up_after" json:"give_up_after"`
}

// NeedsHost reports whether some URL names the host ({host}): only then
// is a host id needed at all (one image per host, or a static endpoint,
// boots without one).
func (k Key) NeedsHost() bool {
	for _, u := range k.URLs {
		if strings.Contains(u, keyproto.HostPlaceholder) {
			return true
		}
	}
	return false
}

// Network configures stage 4.
type Network struct {
	// IP holds ip= values in the dracut/klibc forms (a single YAML string
	// or a list) and their plan. Empty means "dhcp".
	IP   IPPlan `yaml:"ip" json:"ip,omitzero"`
	Keep bool   `yaml:"keep" json:"keep"`
}

// Root is the real root file system.
type Root struct {
	Device  string   `yaml:"device" json:"device"`
	FSType  string   `yaml:"fstype" json:"fstype,omitempty"`
	Options []string `yaml:"options" json:"options,omitempty"`
}

// Volume is one LUKS2 partition to unlock: a data volume mounted inside the
// new root, or swap.
type Volume struct {
	Name    string   `yaml:"name" json:"name"`
	Device  string   `yaml:"device" json:"device"`
	Mount   string   `yaml:"mount" json:"mount,omitempty"`
	FSType  string   `yaml:"fstype" json:"fstype,omitempty"`
	Options []string `yaml:"options" json:"options,omitempty"`
	// Swap is false, true (a LUKS2 swap partition opened with the host
	// key) or "random" (plain dm-crypt with a fresh random key each boot,
	// only on a PARTUUID=/PARTLABEL= partition holding no known signature).
	Swap SwapMode `yaml:"swap" json:"swap,omitempty"`
	// AllowDiscards passes TRIM through dm-crypt; off by default because
	// it leaks which blocks are in use.
	AllowDiscards bool `yaml:"allow_discards" json:"allow_discards,omitempty"`
	// NoWorkqueue sets dm-crypt's no_read_workqueue and no_write_workqueue
	// on kernels ≥ 5.9; nil means true (the default).
	NoWorkqueue *bool `yaml:"no_workqueue" json:"no_workqueue,omitempty"`
	// Provision lets the boot format the device at first boot: only when
	// it carries no signature at all (unlock/blank) and the key server
	// says the host's key is new; a data volume gets an ext4 file system
	// (the image then carries mke2fs), a swap volume its swap signature.
	Provision bool `yaml:"provision" json:"provision,omitempty"`
}

// ProvisionFSType is the file system a provisioned data volume gets.
const ProvisionFSType = "ext4"

// NeedsMkfs reports whether a volume provisions a file system, so the
// image must carry mke2fs.
func (c *Config) NeedsMkfs() bool {
	for _, v := range c.Volumes {
		if v.Provision && !v.Swap.On() {
			return true
		}
	}
	return false
}

// SwapMode is how a volume is used as swap.
type SwapMode string

// Swap modes.
const (
	SwapOff    SwapMode = ""
	SwapLUKS   SwapMode = "luks"
	SwapRandom SwapMode = "random"
)

// On reports whether the volume is swap of either kind.
func (m SwapMode) On() bool { return m != SwapOff }

// MarshalJSON writes true, "random" (or false).
func (m SwapMode) MarshalJSON() ([]byte, error) {
	switch m {
	case SwapOff:
		return []byte("false"), nil
	case SwapLUKS:
		return []byte("true"), nil
	}
	return json.Marshal(string(m))
}

// UnmarshalJSON reads what MarshalJSON writes.
func (m *SwapMode) UnmarshalJSON(b []byte) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	return m.set(v)
}

func (m *SwapMode) set(v any) error {
	switch v {
	case false, nil:
		*m = SwapOff
	case true:
		*m = SwapLUKS
	case "random":
		*m = SwapRandom
	default:
		return fmt.Errorf("swap: %v: want true, false or random", v)
	}
	return nil
}

// WorkqueueBypass reports whether the workqueue flags are wanted.
func (v Volume) WorkqueueBypass() bool { return v.NoWorkqueue == nil || *v.NoWorkqueue }

// Boot is the part of the configuration that comes only from the kernel
// command line.
type Boot struct {
	Init        string       // init= (default /sbin/init)
	Nameservers []netip.Addr // nameserver=, in order, without duplicates
	Debug       bool         // rd.unlockrd.debug
	Host        string       // rd.unlockrd.host= (a valid host id)
	Token       string       // rd.unlockrd.token= (secret: never log it)
	// ReadWrite is set by "rw", cleared by "ro"; nil leaves root.options alone.
	ReadWrite *bool
	// DeviceTimeout (rd.unlockrd.device-timeout=) bounds the wait for the
	// root and volume devices; 0 keeps the built-in default (2 minutes).
	DeviceTimeout time.Duration
}

// Defaults applied by Normalize.
const (
	DefaultAttemptTimeout = 10 * time.Second
	DefaultInit           = "/sbin/init"
	DefaultIP             = "dhcp"
)

// Normalize fills defaults; it is idempotent.
func (c *Config) Normalize() {
	if c.Key.AttemptTimeout == 0 {
		c.Key.AttemptTimeout = Duration(DefaultAttemptTimeout)
	}
	if c.Key.Host.From == SourceNone {
		c.Key.Host = HostSource{From: SourceSMBIOSUUID}
	}
	if c.Network.IP.IsZero() {
		c.Network.IP, _ = ParseIPPlan(nil) // "dhcp" always parses
	}
	if c.Boot.Init == "" {
		c.Boot.Init = DefaultInit
	}
	for i := range c.Modules {
		c.Modules[i] = strings.ReplaceAll(c.Modules[i], "-", "_")
	}
}

var (
	nameRE   = charset{first: alnum, rest: anyOf(alnum, "_.+-"), max: 127}
	moduleRE = charset{first: anyOf(alnum, "_-"), rest: anyOf(alnum, "_-"), max: 255}
	fstypeRE = charset{first: anyOf(lowerDigit, "_."), rest: anyOf(lowerDigit, "_."), max: 64}
)

// Validate checks every field; the error names the first bad field.
func (c *Config) Validate() error {
	if len(c.Key.URLs) == 0 {
		return fieldErr("key.urls", "at least one URL is required")
	}
	for i, u := range c.Key.URLs {
		if err := ValidateURL(u); err != nil {
			return fieldErr(fmt.Sprintf("key.urls[%d]", i), err.Error())
		}
	}
	if len(c.Key.Pins) == 0 && c.Key.CA.IsZero() {
		return fieldErr("key.pins", "at least one pin (or key.ca) is required: the server is trusted only through a pin or a CA certificate the image carries")
	}
	// Pins, key.host, key.token and network.ip were parsed when read;
	// a value built in Go is checked the same way here.
	if _, err := ParseHostSource(c.Key.Host.String()); err != nil {
		return fieldErr("key.host", err.Error())
	}
	if _, err := ParseTokenSource(c.Key.Token.String()); err != nil {
		return fieldErr("key.token", err.Error())
	}
	if c.Key.AttemptTimeout < 0 {
		return fieldErr("key.attempt_timeout", "must not be negative")
	}
	if c.Key.GiveUpAfter < 0 {
		return fieldErr("key.give_up_after", "must not be negative")
	}
	if _, err := ParseIPPlan(c.Network.IP.Values); err != nil {
		return fieldErr("network.ip", err.Error())
	}
	if c.Root.Device == "" {
		return fieldErr("root.device", "required")
	}
	if err := ValidateDeviceRef(c.Root.Device); err != nil {
		return fieldErr("root.device", err.Error())
	}
	if c.Root.FSType != "" && !fstypeRE.MatchString(c.Root.FSType) {
		return fieldErr("root.fstype", fmt.Sprintf("%q is not a file system type", c.Root.FSType))
	}
	names := map[string]bool{}
	mounts := map[string]bool{}
	for i, v := range c.Volumes {
		f := fmt.Sprintf("volumes[%d]", i)
		if !nameRE.MatchString(v.Name) {
			return fieldErr(f+".name", fmt.Sprintf("%q is not a valid mapper name (letters, digits, _ . + -)", v.Name))
		}
		if names[v.Name] {
			return fieldErr(f+".name", fmt.Sprintf("%q is used twice", v.Name))
		}
		names[v.Name] = true
		if v.Device == "" {
			return fieldErr(f+".device", "required")
		}
		if err := ValidateDeviceRef(v.Device); err != nil {
			return fieldErr(f+".device", err.Error())
		}
		if v.Provision {
			if v.Swap == SwapRandom {
				return fieldErr(f+".provision", "swap: random is never formatted (it gets a fresh key every boot)")
			}
			if k, _, _ := strings.Cut(v.Device, "="); k != "PARTUUID" && k != "PARTLABEL" {
				return fieldErr(f+".device", fmt.Sprintf("%q: provision formats the partition, so it must be named by PARTUUID= or PARTLABEL=", v.Device))
			}
			if !v.Swap.On() && v.FSType != "" && v.FSType != ProvisionFSType {
				return fieldErr(f+".fstype", fmt.Sprintf("%q: provision makes %s file systems only", v.FSType, ProvisionFSType))
			}
		}
		if v.Swap.On() {
			if v.Mount != "" || v.FSType != "" {
				return fieldErr(f+".mount", "a swap volume has no mount point or fstype")
			}
			if k, _, _ := strings.Cut(v.Device, "="); v.Swap == SwapRandom && k != "PARTUUID" && k != "PARTLABEL" {
				return fieldErr(f+".device", fmt.Sprintf("%q: swap: random overwrites the partition, so it must be named by PARTUUID= or PARTLABEL=", v.Device))
			}
			continue
		}
		if v.Mount == "" {
			return fieldErr(f+".mount", "required for a non-swap volume")
		}
		if !path.IsAbs(v.Mount) || path.Clean(v.Mount) != v.Mount || v.Mount == "/" {
			return fieldErr(f+".mount", fmt.Sprintf("%q must be a clean absolute path other than /", v.Mount))
		}
		if mounts[v.Mount] {
			return fieldErr(f+".mount", fmt.Sprintf("%q is used twice", v.Mount))
		}
		mounts[v.Mount] = true
		if v.FSType != "" && !fstypeRE.MatchString(v.FSType) {
			return fieldErr(f+".fstype", fmt.Sprintf("%q is not a file system type", v.FSType))
		}
	}
	for i, m := range c.Modules {
		if !moduleRE.MatchString(m) {
			return fieldErr(fmt.Sprintf("modules[%d]", i), fmt.Sprintf("%q is not a module name", m))
		}
	}
	return nil
}

// FieldError names the configuration field that is wrong.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }

func fieldErr(field, msg string) error { return &FieldError{Field: field, Msg: msg} }

// ValidateURL checks a key URL: https, a host, no credentials, no fragment.
func ValidateURL(s string) error {
	const sentinel = "unlockrd-host-placeholder"
	u, err := url.Parse(strings.ReplaceAll(s, keyproto.HostPlaceholder, sentinel))
	if err != nil {
		return fmt.Errorf("malformed URL %q: %v", s, err)
	}
	if u.Scheme != "https" {
		return fmt.Errorf("URL %q: scheme must be https", s)
	}
	if u.Hostname() == "" {
		return fmt.Errorf("URL %q: no host", s)
	}
	if strings.Contains(u.Host, sentinel) {
		// The host id names the key, not the server the pin covers.
		return fmt.Errorf("URL %q: %s may appear in the path or query only", s, keyproto.HostPlaceholder)
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("URL %q: port %s out of range", s, p)
		}
	}
	if u.User != nil {
		return fmt.Errorf("URL %q: credentials in URLs are not allowed (use key.token)", s)
	}
	if u.Fragment != "" {
		return fmt.Errorf("URL %q: fragment not allowed", s)
	}
	return nil
}

// ValidateDeviceRef checks the syntax of a device reference.
func ValidateDeviceRef(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok {
		if strings.HasPrefix(s, "/dev/") && len(s) > len("/dev/") && path.Clean(s) == s {
			return nil
		}
		return fmt.Errorf("%q: want UUID=, PARTUUID=, PARTLABEL=, LABEL= or a /dev/ path", s)
	}
	if v == "" {
		return fmt.Errorf("%q: empty value", s)
	}
	switch k {
	case "UUID", "PARTUUID":
		if !uuidRE.MatchString(v) {
			return fmt.Errorf("%q: %s is not a UUID", s, v)
		}
	case "PARTLABEL", "LABEL":
	default:
		return fmt.Errorf("%q: unknown reference kind %s (want UUID, PARTUUID, PARTLABEL or LABEL)", s, k)
	}
	return nil
}

// uuidRE accepts the UUID forms blkid prints: 8-4-4-4-12 (ext4, LUKS,
// GPT), 4-4 (vfat) and 16 hex digits (NTFS).
var uuidRE = uuidForms{"8-4-4-4-12", "4-4", "16"}

// Duration is a time.Duration written as "10s" (or 0) in YAML and JSON.
type Duration time.Duration

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

func (d Duration) String() string { return time.Duration(d).String() }

func parseDuration(s string) (Duration, error) {
	if s == "0" {
		return 0, nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("%q is not a duration like 10s or 2m", s)
	}
	return Duration(v), nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// UnmarshalJSON reads what MarshalJSON writes.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := parseDuration(s)
	*d = v
	return err
}

// Embed returns the JSON form stored in the image.
func (c *Config) Embed() ([]byte, error) {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// LoadEmbedded parses the JSON form stored in the image, strictly, and
// validates it.
func LoadEmbedded(b []byte) (*Config, error) {
	var c Config
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("embedded configuration: %w", err)
	}
	c.Normalize()
	// The builder validated it; checked again because the init acts on
	// it and an image can be assembled by other means.
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("embedded configuration: %w", err)
	}
	return &c, nil
}
