package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/unlockrd/unlockrd/qemu-tests/testinit/initcfg"
)

// report prints the facts in a fixed order so tests can rely on "done"
// coming after everything else.
func report(r *reporter, cfg initcfg.Config) {
	r.printf("root=%s", rootMount())
	for _, p := range cfg.Files {
		reportFile(r, p)
	}
	for _, l := range tail(readLines("/proc/swaps"), 1) {
		r.printf("swaps %s", strings.Join(strings.Fields(l), " "))
	}
	for _, l := range readLines("/proc/self/mounts") {
		r.printf("mounts %s", l)
	}
	reportLinks(r)
	reportRoutes(r)
	reportBlocks(r)
	reportDM(r)
	reportCrypto(r)
	r.printf("cmdline %s", strings.TrimSpace(readString("/proc/cmdline")))
	r.printf("initramfs-gone=%t", !exists("/init") && !exists("/etc/unlockrd"))
}

type mountEntry struct {
	source, target, fstype, options string
}

func readMounts() []mountEntry {
	var ms []mountEntry
	for _, l := range readLines("/proc/self/mounts") {
		f := strings.Fields(l)
		if len(f) < 4 {
			continue
		}
		ms = append(ms, mountEntry{source: f[0], target: f[1], fstype: f[2], options: f[3]})
	}
	return ms
}

// rootMount is the last mount on / because a switch_root stacks the new
// root over the initramfs's rootfs entry.
func rootMount() string {
	root := "unknown"
	for _, m := range readMounts() {
		if m.target == "/" {
			root = m.source + " " + m.fstype
		}
	}
	return root
}

func reportFile(r *reporter, path string) {
	b, err := os.ReadFile(path)
	if err != nil {
		r.printf("file %s error=%v", path, err)
		return
	}
	sum := sha256.Sum256(b)
	r.printf("file %s sha256=%s content=%s", path, hex.EncodeToString(sum[:]), initcfg.FirstLine(b))
}

func reportLinks(r *reporter) {
	ifs, err := net.Interfaces()
	if err != nil {
		r.printf("links error=%v", err)
		return
	}
	for _, ifc := range ifs {
		var addrs []string
		as, err := ifc.Addrs()
		if err != nil {
			addrs = append(addrs, "error:"+err.Error())
		}
		for _, a := range as {
			addrs = append(addrs, a.String())
		}
		mac := ifc.HardwareAddr.String()
		if mac == "" {
			mac = "-"
		}
		addr := strings.Join(addrs, ",")
		if addr == "" {
			addr = "-"
		}
		r.printf("links %s flags=%s mac=%s addrs=%s", ifc.Name, ifc.Flags, mac, addr)
	}
}

// reportRoutes prints the IPv4 routing table, so tests can check that the
// network configuration was torn down (or kept) after switch root.
func reportRoutes(r *reporter) {
	for _, l := range tail(readLines("/proc/net/route"), 1) {
		f := strings.Fields(l)
		if len(f) < 8 {
			continue
		}
		dst, gw, mask := hexIPv4(f[1]), hexIPv4(f[2]), hexIPv4(f[7])
		ones, _ := net.IPMask(mask.To4()).Size()
		r.printf("route %s %s/%d gw=%s", f[0], dst, ones, gw)
	}
}

// hexIPv4 decodes /proc/net/route's addresses: 32-bit hex in host (little)
// endian order.
func hexIPv4(s string) net.IP {
	v, err := strconv.ParseUint(s, 16, 32)
	if err != nil {
		return net.IPv4zero
	}
	b := make([]byte, 4)
	binary.LittleEndian.PutUint32(b, uint32(v))
	return net.IP(b)
}

// reportBlocks lists block devices with their GPT partition names: the
// guest kernel's view is the real check of the disk the harness wrote.
func reportBlocks(r *reporter) {
	ents, err := os.ReadDir("/sys/class/block")
	if err != nil {
		r.printf("block error=%v", err)
		return
	}
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, "loop") || strings.HasPrefix(name, "ram") {
			continue
		}
		dir := filepath.Join("/sys/class/block", name)
		ue := map[string]string{}
		for _, l := range readLines(filepath.Join(dir, "uevent")) {
			k, v, _ := strings.Cut(l, "=")
			ue[k] = v
		}
		sectors, _ := strconv.ParseInt(strings.TrimSpace(readString(filepath.Join(dir, "size"))), 10, 64)
		line := fmt.Sprintf("block %s type=%s size=%d", name, ue["DEVTYPE"], sectors*512)
		if pn, ok := ue["PARTN"]; ok {
			start := strings.TrimSpace(readString(filepath.Join(dir, "start")))
			line += fmt.Sprintf(" partn=%s start=%s partname=%s", pn, start, ue["PARTNAME"])
		}
		r.printf("%s", line)
	}
}

func reportDM(r *reporter) {
	names, _ := filepath.Glob("/sys/block/dm-*/dm/name")
	sort.Strings(names)
	for _, p := range names {
		name := strings.TrimSpace(readString(p))
		targets, err := dmTable(name)
		if err != nil {
			r.printf("dm %s error=%v", name, err)
			continue
		}
		for _, t := range targets {
			r.printf("dm %s %d %d %s %s", name, t.start, t.length, t.kind, hideKey(t.kind, t.params))
		}
	}
}

// hideKey replaces a crypt target's key (its second parameter) so a
// volume key never reaches a console log.
func hideKey(kind, params string) string {
	if kind != "crypt" {
		return params
	}
	f := strings.Fields(params)
	if len(f) >= 2 {
		f[1] = "<key>"
	}
	return strings.Join(f, " ")
}

func readString(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

func readLines(path string) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var lines []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		lines = append(lines, s.Text())
	}
	return lines
}

func tail(lines []string, skip int) []string {
	if len(lines) <= skip {
		return nil
	}
	return lines[skip:]
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// reportCrypto prints the kernel's xts(aes) implementations from
// /proc/crypto, with their module and reference count, and the AES
// modules' use counts from /proc/modules: which implementation the
// dm-crypt mappings hold (AES-NI or generic) is the one whose count went
// up when they were made.
func reportCrypto(r *reporter) {
	entry := map[string]string{}
	flush := func() {
		if entry["name"] == "xts(aes)" {
			r.printf("crypto name=%s driver=%s module=%s priority=%s refcnt=%s",
				entry["name"], entry["driver"], entry["module"], entry["priority"], entry["refcnt"])
		}
		entry = map[string]string{}
	}
	for _, l := range readLines("/proc/crypto") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			flush()
			continue
		}
		k = strings.TrimSpace(k)
		if k == "name" && len(entry) > 0 {
			flush()
		}
		entry[k] = strings.TrimSpace(v)
	}
	flush()
	for _, l := range readLines("/proc/modules") {
		f := strings.Fields(l)
		if len(f) >= 3 && (f[0] == "aesni_intel" || f[0] == "xts" || f[0] == "crypto_simd" || f[0] == "cryptd") {
			r.printf("module %s refs=%s", f[0], f[2])
		}
	}
}
