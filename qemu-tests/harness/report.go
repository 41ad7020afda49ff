package harness

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Report is what the test init printed about the booted system, parsed.
type Report struct {
	// PID of the test init: 1 when unlockrd exec'd it as init.
	PID int
	// Uptime is the kernel's clock when the test init started.
	Uptime time.Duration
	// RunInit is the kernel's clock when it started the initramfs /init
	// (0 when the kernel log did not have it): Uptime-RunInit is the time
	// spent in the initramfs.
	RunInit time.Duration
	// Root is the source and type of the mount on /, e.g. "/dev/vda1 ext4".
	Root string
	// Files by path, for each file the configuration listed.
	Files map[string]FileReport
	// Swaps are /proc/swaps lines (without the header), spaces collapsed.
	Swaps []string
	// Mounts are /proc/self/mounts lines.
	Mounts []string
	// Links are "<name> flags=... mac=... addrs=a,b" lines.
	Links []string
	// Routes are IPv4 routes: "<dev> <dst>/<bits> gw=<gw>".
	Routes []string
	// Blocks are block devices: "<name> type=... size=... [partn=...
	// start=... partname=...]".
	Blocks []string
	// DM are device-mapper targets: "<name> <start> <length> <type>
	// <params>", a crypt key replaced by <key>.
	DM []string
	// Crypto are the xts(aes) entries of /proc/crypto: "name=xts(aes)
	// driver=... module=... priority=... refcnt=...".
	Crypto []string
	// Modules are "<name> refs=<use count>" of the AES modules loaded.
	Modules []string
	// Cmdline is /proc/cmdline.
	Cmdline string
	// InitramfsGone is true when neither /init nor /etc/unlockrd exist.
	InitramfsGone bool
	// Setup lines (harness self-tests) and anything else unrecognised.
	Setup, Other []string
}

// FileReport is one file the test init read.
type FileReport struct {
	SHA256, Content, Error string
}

// MountEntry is a parsed /proc/self/mounts line.
type MountEntry struct {
	Source, Target, FSType, Options string
}

// ParseReport parses test init lines (with or without the TESTINIT:
// prefix; lines without it are ignored when any line has it).
func ParseReport(lines []string) (*Report, error) {
	r := &Report{Files: map[string]FileReport{}}
	seenPID := false
	for _, l := range lines {
		body, ok := strings.CutPrefix(l, TestInitPrefix)
		if !ok {
			continue
		}
		key, rest, _ := strings.Cut(body, " ")
		switch {
		case strings.HasPrefix(body, "pid="):
			pid, err := strconv.Atoi(strings.TrimPrefix(body, "pid="))
			if err != nil {
				return nil, fmt.Errorf("harness: report line %q: %w", l, err)
			}
			r.PID, seenPID = pid, true
		case strings.HasPrefix(body, "uptime="):
			v, err := strconv.ParseFloat(strings.TrimPrefix(body, "uptime="), 64)
			if err != nil {
				return nil, fmt.Errorf("harness: report line %q: %w", l, err)
			}
			r.Uptime = time.Duration(v * float64(time.Second))
		case strings.HasPrefix(body, "run-init="):
			v, err := strconv.ParseFloat(strings.TrimPrefix(body, "run-init="), 64)
			if err != nil {
				return nil, fmt.Errorf("harness: report line %q: %w", l, err)
			}
			r.RunInit = time.Duration(v * float64(time.Second))
		case strings.HasPrefix(body, "root="):
			r.Root = strings.TrimPrefix(body, "root=")
		case strings.HasPrefix(body, "initramfs-gone="):
			r.InitramfsGone = strings.TrimPrefix(body, "initramfs-gone=") == "true"
		case key == "file":
			path, attrs, _ := strings.Cut(rest, " ")
			var fr FileReport
			if e, ok := strings.CutPrefix(attrs, "error="); ok {
				fr.Error = e
			} else {
				sum, content, _ := strings.Cut(attrs, " ")
				fr.SHA256 = strings.TrimPrefix(sum, "sha256=")
				fr.Content = strings.TrimPrefix(content, "content=")
			}
			r.Files[path] = fr
		case key == "swaps":
			r.Swaps = append(r.Swaps, rest)
		case key == "mounts":
			r.Mounts = append(r.Mounts, rest)
		case key == "links":
			r.Links = append(r.Links, rest)
		case key == "route":
			r.Routes = append(r.Routes, rest)
		case key == "block":
			r.Blocks = append(r.Blocks, rest)
		case key == "dm":
			r.DM = append(r.DM, rest)
		case key == "crypto":
			r.Crypto = append(r.Crypto, rest)
		case key == "module":
			r.Modules = append(r.Modules, rest)
		case key == "cmdline":
			r.Cmdline = rest
		case key == "setup":
			r.Setup = append(r.Setup, rest)
		case body == "done":
		default:
			r.Other = append(r.Other, body)
		}
	}
	if !seenPID {
		return nil, fmt.Errorf("harness: no %spid= line in the report", TestInitPrefix)
	}
	return r, nil
}

// DMTable returns the table of the device-mapper device name, e.g.
// "0 40960 crypt aes-xts-plain64 <key> 0 254:2 6144 2 no_read_workqueue
// no_write_workqueue".
func (r *Report) DMTable(name string) (string, bool) {
	var ts []string
	for _, l := range r.DM {
		if n, t, _ := strings.Cut(l, " "); n == name {
			ts = append(ts, t)
		}
	}
	return strings.Join(ts, "\n"), len(ts) > 0
}

// CryptoImpl is one xts(aes) implementation the guest's kernel has.
type CryptoImpl struct {
	Driver, Module string
	Priority       int
	Refcnt         int
}

// XTSAES returns the guest's xts(aes) implementations (Crypto parsed).
func (r *Report) XTSAES() []CryptoImpl {
	var out []CryptoImpl
	for _, l := range r.Crypto {
		var c CryptoImpl
		for _, f := range strings.Fields(l) {
			k, v, _ := strings.Cut(f, "=")
			switch k {
			case "driver":
				c.Driver = v
			case "module":
				c.Module = v
			case "priority":
				c.Priority, _ = strconv.Atoi(v)
			case "refcnt":
				c.Refcnt, _ = strconv.Atoi(v)
			}
		}
		out = append(out, c)
	}
	return out
}

// Mount returns the last mount on target.
func (r *Report) Mount(target string) (MountEntry, bool) {
	var m MountEntry
	found := false
	for _, l := range r.Mounts {
		f := strings.Fields(l)
		if len(f) >= 4 && f[1] == target {
			m, found = MountEntry{Source: f[0], Target: f[1], FSType: f[2], Options: f[3]}, true
		}
	}
	return m, found
}

// LinkAddrs returns the addresses of interface name ("" when it has
// none) and whether it exists.
func (r *Report) LinkAddrs(name string) ([]string, bool) {
	for _, l := range r.Links {
		f := strings.Fields(l)
		if len(f) == 0 || f[0] != name {
			continue
		}
		for _, a := range f[1:] {
			if v, ok := strings.CutPrefix(a, "addrs="); ok {
				if v == "-" {
					return nil, true
				}
				return strings.Split(v, ","), true
			}
		}
		return nil, true
	}
	return nil, false
}

var (
	reportDone  = "^" + regexp.QuoteMeta(TestInitPrefix) + "done$"
	reportStart = regexp.MustCompile("^" + regexp.QuoteMeta(TestInitPrefix) + "pid=")
)

// ExpectReport waits for the test init's "done" line and parses its
// report (the lines since the last "pid=" line).
func (v *VM) ExpectReport(timeout time.Duration) (*Report, error) {
	if _, err := v.ExpectLine(reportDone, timeout); err != nil {
		return nil, err
	}
	v.mu.Lock()
	lines := v.lines[:v.cursor]
	v.mu.Unlock()
	first := 0
	for i := len(lines) - 1; i >= 0; i-- {
		if reportStart.MatchString(lines[i].Text) {
			first = i
			break
		}
	}
	var texts []string
	for i := first; i < len(lines); i++ {
		t := lines[i].Text
		// A report line the kernel wrote a record into is put back
		// together (rejoined).
		if j, ok := rejoined(lines, i); ok && strings.HasPrefix(t, TestInitPrefix) {
			t = j
			i++
		}
		texts = append(texts, t)
	}
	r, err := ParseReport(texts)
	if err != nil {
		return nil, fmt.Errorf("harness: VM %s: %w", v.name, err)
	}
	return r, nil
}
