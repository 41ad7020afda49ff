package kmod

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/ulikunitz/xz"

	"github.com/unlockrd/unlockrd/initramfs/ulog/ulogtest"
)

// fakeModule returns a minimal relocatable x86-64 ELF file whose only
// content is a .modinfo section holding info: enough for the builder,
// which reads nothing else.
func fakeModule(info ...string) []byte {
	modinfo := []byte(strings.Join(info, "\x00") + "\x00")
	shstr := []byte("\x00.modinfo\x00.shstrtab\x00")
	const ehsize, shentsize = 64, 64
	modOff := uint64(ehsize)
	strOff := modOff + uint64(len(modinfo))
	shOff := (strOff + uint64(len(shstr)) + 7) &^ 7
	var buf bytes.Buffer
	hdr := elf.Header64{
		Type: uint16(elf.ET_REL), Machine: uint16(elf.EM_X86_64), Version: 1,
		Shoff: shOff, Ehsize: ehsize, Shentsize: shentsize, Shnum: 3, Shstrndx: 2,
	}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	hdr.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	hdr.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	binary.Write(&buf, binary.LittleEndian, hdr)
	buf.Write(modinfo)
	buf.Write(shstr)
	buf.Write(make([]byte, int(shOff)-buf.Len()))
	for _, s := range []elf.Section64{
		{},
		{Name: 1, Type: uint32(elf.SHT_PROGBITS), Flags: uint64(elf.SHF_ALLOC), Off: modOff, Size: uint64(len(modinfo)), Addralign: 1},
		{Name: 10, Type: uint32(elf.SHT_STRTAB), Off: strOff, Size: uint64(len(shstr)), Addralign: 1},
	} {
		binary.Write(&buf, binary.LittleEndian, s)
	}
	return buf.Bytes()
}

// fakeTree writes modules (path → modinfo strings) and index files
// (name → contents) into a new tree.
func fakeTree(t *testing.T, mods map[string][]string, index map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "kernel"), 0o755); err != nil {
		t.Fatal(err)
	}
	for p, info := range mods {
		info = append(info, "vermagic=9.9.9-test SMP mod_unload ")
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, p), fakeModule(info...), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for name, s := range index {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func names(ms []Module) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.Name)
	}
	return out
}

func TestSyntheticOrder(t *testing.T) {
	dir := fakeTree(t, map[string][]string{
		"kernel/a.ko":         {"depends=b-mod,c", "softdep=pre: alias-x post: e"},
		"kernel/sub/b-mod.ko": {"depends=c"},
		"kernel/c.ko":         {"depends=builtin_one"},
		"kernel/x1.ko":        {"alias=alias-x", "depends="},
		"kernel/x2.ko":        {"alias=alias_x"},
		"kernel/e.ko":         {"depends=a"},
		"kernel/unused.ko":    {"alias=pci:v*d*"},
	}, map[string]string{"modules.builtin": "kernel/builtin-one.ko\n"})
	tree, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if tree.Release() != "9.9.9-test" || tree.Machine() != elf.EM_X86_64 {
		t.Errorf("Release %q Machine %v", tree.Release(), tree.Machine())
	}
	got, err := tree.Closure([]string{"a"})
	if err != nil {
		t.Fatal(err)
	}
	want := []Module{
		{Name: "x1", Path: "kernel/x1.ko", Deps: []string{}, Optional: true},
		{Name: "x2", Path: "kernel/x2.ko", Deps: []string{}, Optional: true},
		{Name: "c", Path: "kernel/c.ko", Deps: []string{}},
		{Name: "b_mod", Path: "kernel/sub/b-mod.ko", Deps: []string{"c"}},
		{Name: "a", Path: "kernel/a.ko", Deps: []string{"x1", "x2", "c", "b_mod"}},
		{Name: "e", Path: "kernel/e.ko", Deps: []string{"x1", "x2", "c", "b_mod", "a"}, Optional: true},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n%+v\nwant\n%+v", got, want)
	}
}

func TestSyntheticErrors(t *testing.T) {
	dir := fakeTree(t, map[string][]string{
		"kernel/a.ko":      {"depends=gone"},
		"kernel/cyc1.ko":   {"depends=cyc2"},
		"kernel/cyc2.ko":   {"depends=cyc1"},
		"kernel/soft1.ko":  {"softdep=pre: soft2"},
		"kernel/soft2.ko":  {"softdep=pre: soft1"},
		"kernel/nosoft.ko": {"softdep=pre: nothing-provides-this"},
	}, nil)
	tree, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	var log ulogtest.Logger
	tree.SetLogger(&log)
	_, err = tree.Closure([]string{"a"})
	if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "module a depends on gone") {
		t.Errorf("missing dependency: %v", err)
	}
	if _, err = tree.Closure([]string{"cyc1"}); err == nil || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("hard cycle: %v", err)
	}
	got, err := tree.Closure([]string{"soft1"})
	if err != nil || !reflect.DeepEqual(names(got), []string{"soft2", "soft1"}) {
		t.Errorf("soft cycle: %v %v", names(got), err)
	}
	got, err = tree.Closure([]string{"nosoft"})
	if err != nil || len(got) != 1 || !strings.Contains(log.String(), "no module provides it") {
		t.Errorf("unprovided softdep: %v %v %q", got, err, log.String())
	}
	if !strings.Contains(log.String(), "no modules.builtin") {
		t.Errorf("a note made by Open was lost: %q", log.String())
	}
}

// With modules.dep, the index files are the truth, not the modules: here
// they disagree on purpose.
func TestSyntheticModulesDep(t *testing.T) {
	dir := fakeTree(t, map[string][]string{
		"kernel/a.ko":          {"depends=wrong"},
		"kernel/b.ko":          {},
		"kernel/c.ko":          {},
		"updates/p.ko":         {},
		"kernel/not-listed.ko": {},
	}, map[string]string{
		"modules.dep":     "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\nupdates/p.ko:\n",
		"modules.softdep": "# comment\nsoftdep a post: some-alias\n",
		"modules.alias":   "alias some-alias p\nalias pci:v00001AF4* c\n",
		"modules.builtin": "",
	})
	tree, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !tree.HasModulesDep() {
		t.Fatal("modules.dep ignored")
	}
	got, err := tree.Closure([]string{"a"})
	if err != nil {
		t.Fatal(err)
	}
	want := []Module{
		{Name: "c", Path: "kernel/c.ko", Deps: []string{}},
		{Name: "b", Path: "kernel/b.ko", Deps: []string{"c"}},
		{Name: "a", Path: "kernel/a.ko", Deps: []string{"c", "b"}},
		{Name: "p", Path: "updates/p.ko", Deps: []string{"c", "b", "a"}, Optional: true},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got\n%+v\nwant\n%+v", got, want)
	}
	if _, err := tree.Closure([]string{"not_listed"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("a module missing from modules.dep: %v", err)
	}
	// A device alias pattern resolves a configured name.
	got, err = tree.Closure([]string{"pci:v00001AF4d00001000"})
	if err != nil || !reflect.DeepEqual(names(got), []string{"c"}) {
		t.Errorf("pattern alias: %v %v", names(got), err)
	}
}

func TestPreferredDuplicate(t *testing.T) {
	dir := fakeTree(t, map[string][]string{
		"kernel/drivers/dup.ko": {},
		"updates/dkms/dup.ko":   {},
	}, map[string]string{"modules.builtin": ""})
	tree, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := tree.Closure([]string{"dup"})
	if err != nil || len(got) != 1 || got[0].Path != "updates/dkms/dup.ko" {
		t.Errorf("got %v %v, want the updates/ copy", got, err)
	}
}

func TestHelpers(t *testing.T) {
	for in, want := range map[string]string{
		"a/b.ko": "a/b.ko", "a/b.ko.xz": "a/b.ko", "a/b.ko.zst": "a/b.ko", "a/b.ko.gz": "a/b.ko",
	} {
		if got := StripCompression(in); got != want {
			t.Errorf("StripCompression(%q) = %q", in, got)
		}
	}
	for in, want := range map[string]string{
		"crypto-crc32c": "crypto_crc32c", "pci:v[a-f]d-x": "pci:v[a-f]d_x", "dm-mod": "dm_mod",
	} {
		if got := normalizeAlias(in); got != want {
			t.Errorf("normalizeAlias(%q) = %q, want %q", in, got, want)
		}
	}
	var sd softdep
	sd.addSpec("stray pre: a b post: c pre: d")
	if !reflect.DeepEqual(sd, softdep{pre: []string{"a", "b", "d"}, post: []string{"c"}}) {
		t.Errorf("softdep %+v", sd)
	}
	if relPath("/lib/modules/6.1.0/kernel/x.ko") != "kernel/x.ko" {
		t.Error("relPath")
	}
}

// /lib/modules/<release> is a symbolic link on some systems.
func TestOpenThroughSymlink(t *testing.T) {
	dir := fakeTree(t, map[string][]string{"kernel/m.ko": {}}, map[string]string{"modules.builtin": ""})
	link := filepath.Join(t.TempDir(), "9.9.9-test")
	if err := os.Symlink(dir, link); err != nil {
		t.Fatal(err)
	}
	tree, err := Open(link)
	if err != nil {
		t.Fatal(err)
	}
	got, err := tree.Closure([]string{"m"})
	if err != nil || len(got) != 1 || got[0].Path != "kernel/m.ko" {
		t.Fatalf("got %v, %v", got, err)
	}
	if _, err := tree.ReadModule(got[0]); err != nil {
		t.Fatal(err)
	}
}

// FuzzPrefixDecoder feeds damaged .xz files to the prefix decoder: it may
// fail, never panic (its bit decoder reads past the input into padding
// without a bounds branch of its own; decodeLZMA must stop it in time).
func FuzzPrefixDecoder(f *testing.F) {
	var xzFile bytes.Buffer
	w, err := xz.NewWriter(&xzFile)
	if err != nil {
		f.Fatal(err)
	}
	for i := 0; i < 2000; i++ {
		fmt.Fprintf(w, "alias=pci:v%08Xd*sv*sd*bc*sc*i*\x00vermagic=6.12 SMP\x00", i*7919)
	}
	if err := w.Close(); err != nil {
		f.Fatal(err)
	}
	good := xzFile.Bytes()
	f.Add(good, uint(0), byte(0))
	f.Add(good, uint(40), byte(0xff))
	f.Add(good[:len(good)/2], uint(0), byte(0))
	f.Fuzz(func(t *testing.T, b []byte, at uint, x byte) {
		b = bytes.Clone(b)
		if len(b) > 0 {
			b[at%uint(len(b))] ^= x
		}
		d := newPrefixDecoder(b)
		if d == nil {
			return
		}
		_ = d.fill(1 << 20)
		if len(d.out) > 1<<20+(1<<21) {
			t.Fatalf("decoded %d bytes when asked for 1 MiB", len(d.out))
		}
	})
}

// newPrefixDecoder returns a fresh decoder of the .xz file in, or nil when
// in is not one (or holds other filters than LZMA2); the scan itself
// reuses one decoder per goroutine (scanBuffers).
func newPrefixDecoder(in []byte) *prefixDecoder {
	d := new(prefixDecoder)
	if !d.init(in) {
		return nil
	}
	return d
}
