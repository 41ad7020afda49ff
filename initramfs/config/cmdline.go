package config

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/unlockrd/unlockrd/netboot/ipconf"
	"github.com/unlockrd/unlockrd/unlock/keyproto"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

// Prefix starts every unlockrd-specific kernel parameter.
const Prefix = "rd.unlockrd."

// Param is one kernel command-line parameter.
type Param struct {
	Key   string
	Value string
	// HasValue distinguishes "rw" from "rw=".
	HasValue bool
}

// SplitCmdline splits a kernel command line the way the kernel does: on
// spaces, with double quotes grouping (and removed).
func SplitCmdline(s string) []Param {
	var out []Param
	var cur strings.Builder
	inQuote, any := false, false
	flush := func() {
		if !any {
			return
		}
		w := cur.String()
		k, v, ok := strings.Cut(w, "=")
		out = append(out, Param{Key: k, Value: v, HasValue: ok})
		cur.Reset()
		any = false
	}
	for _, r := range s {
		switch {
		case r == '"':
			inQuote = !inQuote
			any = true
		case !inQuote && (r == ' ' || r == '\t' || r == '\n'):
			flush()
		default:
			cur.WriteRune(r)
			any = true
		}
	}
	flush()
	return out
}

// ApplyCmdline overrides the configuration with kernel parameters
// (DESIGN §4). A parameter with a bad value is not applied; the returned
// error names each one, and the caller reports it and carries on with the
// configured value. The warnings are about values that were applied but
// are unwise; the caller prints them.
func (c *Config) ApplyCmdline(cmdline string) (warnings []string, err error) {
	var errs []error
	bad := func(p Param, format string, a ...any) {
		errs = append(errs, fmt.Errorf("kernel parameter %s: %s", p.Key, fmt.Sprintf(format, a...)))
	}
	var ips, urls []string
	var pins []pin.Pin
	for _, p := range SplitCmdline(cmdline) {
		switch p.Key {
		case "root":
			if err := ValidateDeviceRef(p.Value); err != nil {
				bad(p, "%v", err)
				continue
			}
			c.Root.Device = p.Value
		case "rootfstype":
			if !fstypeRE.MatchString(p.Value) {
				bad(p, "%q is not a file system type", p.Value)
				continue
			}
			c.Root.FSType = p.Value
		case "rootflags":
			for _, o := range strings.Split(p.Value, ",") {
				if o != "" {
					c.Root.Options = append(c.Root.Options, o)
				}
			}
		case "ro", "rw":
			if p.HasValue {
				bad(p, "takes no value")
				continue
			}
			rw := p.Key == "rw"
			c.Boot.ReadWrite = &rw
		case "init":
			if !strings.HasPrefix(p.Value, "/") {
				bad(p, "%q must be an absolute path", p.Value)
				continue
			}
			c.Boot.Init = p.Value
		case "ip":
			if p.Value == "" {
				bad(p, "empty value")
				continue
			}
			ips = append(ips, p.Value)
		case "nameserver":
			a, err := ipconf.ParseNameserver(p.Value)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if !slices.Contains(c.Boot.Nameservers, a) {
				c.Boot.Nameservers = append(c.Boot.Nameservers, a)
			}
		case Prefix + "url":
			if err := ValidateURL(p.Value); err != nil {
				bad(p, "%v", err)
				continue
			}
			urls = append(urls, p.Value)
		case Prefix + "pin":
			v, err := pin.Parse(p.Value)
			if err != nil {
				bad(p, "%v", err)
				continue
			}
			pins = append(pins, v)
		case Prefix + "host":
			if !keyproto.ValidHostID(p.Value) {
				bad(p, "%q is not a valid host id", p.Value)
				continue
			}
			// Recorded only; key.host: cmdline decides whether it is used,
			// unless the config left the source to the command line.
			c.Boot.Host = p.Value
		case Prefix + "token":
			if p.Value == "" {
				bad(p, "empty value")
				continue
			}
			c.Boot.Token = p.Value
			warnings = append(warnings,
				Prefix+"token is readable by every user of the booted system through /proc/cmdline; prefer an SMBIOS credential")
		case Prefix + "device-timeout":
			d, err := parseDuration(p.Value)
			if err != nil || d <= 0 {
				bad(p, "%q is not a positive duration like 30s", p.Value)
				continue
			}
			c.Boot.DeviceTimeout = d.D()
		case Prefix + "debug":
			c.Boot.Debug = true
		case Prefix + "keep-network":
			c.Network.Keep = true
		default:
			if strings.HasPrefix(p.Key, Prefix) {
				bad(p, "unknown unlockrd parameter")
			}
		}
	}
	if len(ips) > 0 {
		// Checked together: values fine alone may contradict each other.
		if plan, err := ParseIPPlan(ips); err != nil {
			errs = append(errs, err)
		} else {
			c.Network.IP = plan
		}
	}
	if len(urls) > 0 {
		c.Key.URLs = urls
	}
	if len(pins) > 0 {
		c.Key.Pins = pins
	}
	if c.Boot.ReadWrite != nil {
		c.Root.Options = setRW(c.Root.Options, *c.Boot.ReadWrite)
	}
	return warnings, errors.Join(errs...)
}

// setRW replaces any ro/rw option with the requested one.
func setRW(opts []string, rw bool) []string {
	out := opts[:0:0]
	for _, o := range opts {
		if o != "ro" && o != "rw" {
			out = append(out, o)
		}
	}
	if rw {
		return append(out, "rw")
	}
	return append(out, "ro")
}
