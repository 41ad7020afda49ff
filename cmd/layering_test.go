// Package cmd holds no code: its test enforces the layering of
// docs/ARCHITECTURE.md over what each binary in cmd/ actually links.
package cmd

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/unlockrd/unlockrd/"

// bootOnly are the packages only PID 1 may link. Some may not exist (yet,
// or any more): a missing one is simply never linked.
var bootOnly = []string{
	"initramfs/boot", "initramfs/modload", "initramfs/sysroot",
	"netboot/netup",
	"unlock/keys", "unlock/volumes", "unlock/dm", "unlock/blockdev",
}

// shared are the packages both sides link; they import neither side.
var shared = []string{
	"initramfs/config", "initramfs/layout", "initramfs/ulog", "initramfs/retry",
	"netboot/ipconf",
	"unlock/pin", "unlock/keyproto", "unlock/luks2", "unlock/secret", "unlock/blank",
}

// allowedForTools are boot-only packages a tool may link for now.
var allowedForTools = map[string]string{}

// under reports whether pkg (a full import path) is rel or inside it.
func under(pkg, rel string) bool {
	return pkg == module+rel || strings.HasPrefix(pkg, module+rel+"/")
}

// isHost reports whether pkg is host-side code: anything in a host/ folder.
func isHost(pkg string) bool {
	rel, ok := strings.CutPrefix(pkg, module)
	return ok && slices.Contains(strings.Split(rel, "/"), "host")
}

func isBootOnly(pkg string) bool {
	return slices.ContainsFunc(bootOnly, func(b string) bool { return under(pkg, b) })
}

// initForbidden says why the init must not link pkg, or "".
func initForbidden(pkg string) string {
	switch {
	case pkg == "net/http" || strings.HasPrefix(pkg, "net/http/"):
		return "net/http (the key fetch has its own small client; the image must stay small)"
	case strings.HasPrefix(pkg, "gopkg.in/yaml"):
		return "YAML (the init reads the builder's JSON only)"
	case isHost(pkg):
		return "host-side code"
	case under(pkg, "qemu-tests"):
		return "test code"
	}
	return ""
}

// toolForbidden says why the tool must not link pkg, or "".
func toolForbidden(tool, pkg string) string {
	switch {
	case isBootOnly(pkg):
		if allowedForTools[strings.TrimPrefix(pkg, module)] == tool {
			return ""
		}
		return "boot-only code"
	case under(pkg, "qemu-tests"):
		return "test code"
	}
	return ""
}

// sharedForbidden says why a shared package must not import pkg, or "".
func sharedForbidden(pkg string) string {
	switch {
	case isBootOnly(pkg):
		return "boot-only code"
	case isHost(pkg):
		return "host-side code"
	}
	return ""
}

// violations checks one package's dependency list.
func violations(name string, deps []string, why func(string) string) []string {
	var out []string
	for _, d := range deps {
		if r := why(d); r != "" {
			out = append(out, name+" links "+d+": "+r)
		}
	}
	return out
}

// check applies every rule to deps, a map from a package (relative to the
// module) to every package it links. Packages absent from deps are skipped.
func check(deps map[string][]string) []string {
	var out []string
	if d, ok := deps["cmd/unlockrd-init"]; ok {
		out = append(out, violations("cmd/unlockrd-init", d, initForbidden)...)
	}
	for _, tool := range []string{"cmd/mkunlockrd", "cmd/unlockrd-keyserver"} {
		if d, ok := deps[tool]; ok {
			out = append(out, violations(tool, d, func(p string) string { return toolForbidden(tool, p) })...)
		}
	}
	for _, s := range shared {
		if d, ok := deps[s]; ok {
			out = append(out, violations(s, d, sharedForbidden)...)
		}
	}
	return out
}

// listDeps runs go list once over the whole module: every package with
// the packages it links (transitively, tests excluded).
func listDeps(t *testing.T) map[string][]string {
	t.Helper()
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Deps " "}}`, module+"...").Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			t.Fatalf("go list: %v\n%s", err, ee.Stderr)
		}
		t.Fatalf("go list: %v", err)
	}
	deps := map[string][]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) > 0 {
			deps[strings.TrimPrefix(f[0], module)] = f[1:]
		}
	}
	return deps
}

// TestLayering enforces docs/ARCHITECTURE.md: the init links no host code,
// no YAML and no net/http; the tools link no boot-only code; shared
// packages import neither side.
func TestLayering(t *testing.T) {
	deps := listDeps(t)
	for _, bin := range []string{"cmd/unlockrd-init", "cmd/mkunlockrd", "cmd/unlockrd-keyserver"} {
		if _, ok := deps[bin]; !ok {
			t.Fatalf("go list does not know %s: the test checks nothing", bin)
		}
	}
	for _, v := range check(deps) {
		t.Error(v)
	}
}

// TestLayeringCheckCatches runs the rules over made-up dependency lists:
// each forbidden link must be reported, and allowed ones must not.
func TestLayeringCheckCatches(t *testing.T) {
	m := func(rel string) string { return module + rel }
	deps := map[string][]string{
		"cmd/unlockrd-init": {
			"fmt", "net/netip", m("initramfs/boot"), m("unlock/keys"), m("initramfs/layout"),
			"net/http", "gopkg.in/yaml.v3", m("initramfs/host/kmod"), m("unlock/host/keyserver/store"),
			m("qemu-tests/harness"),
		},
		"cmd/mkunlockrd": {
			m("initramfs/host/image"), m("initramfs/layout"), m("unlock/luks2"),
			m("unlock/dm"), m("netboot/netup"),
		},
		"cmd/unlockrd-keyserver": {
			m("unlock/host/keyserver"), "net/http", m("unlock/volumes"), m("initramfs/boot/console"),
		},
		"unlock/luks2":     {"io", m("unlock/secret"), m("unlock/blockdev")},
		"initramfs/layout": {"encoding/json", m("initramfs/host/image")},
		"unlock/pin":       {"crypto/sha256"},
	}
	got := check(deps)
	want := []string{
		"cmd/unlockrd-init links net/http",
		"cmd/unlockrd-init links gopkg.in/yaml.v3",
		"cmd/unlockrd-init links " + m("initramfs/host/kmod"),
		"cmd/unlockrd-init links " + m("unlock/host/keyserver/store"),
		"cmd/unlockrd-init links " + m("qemu-tests/harness"),
		"cmd/mkunlockrd links " + m("unlock/dm"),
		"cmd/mkunlockrd links " + m("netboot/netup"),
		"cmd/unlockrd-keyserver links " + m("unlock/volumes"),
		"cmd/unlockrd-keyserver links " + m("initramfs/boot/console"),
		"unlock/luks2 links " + m("unlock/blockdev"),
		"initramfs/layout links " + m("initramfs/host/image"),
	}
	for _, w := range want {
		if !slices.ContainsFunc(got, func(g string) bool { return strings.HasPrefix(g, w+":") }) {
			t.Errorf("not reported: %s", w)
		}
	}
	if len(got) != len(want) {
		t.Errorf("got %d reports, want %d:\n%s", len(got), len(want), strings.Join(got, "\n"))
	}
}
