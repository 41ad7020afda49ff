// Package image writes the unlockrd initramfs: a newc cpio archive (the
// format the kernel unpacks into its initial root file system), compressed
// as a whole, holding the init binary, the validated configuration and the
// kernel modules in load order. It also reads such an image back, for
// `mkunlockrd ls` and for tests.
//
// Images are reproducible: the same inputs give the same bytes, whatever
// the working directory, temporary directory, user, umask or clock of the
// build. File times are SOURCE_DATE_EPOCH (or 0), owners are root, inode
// numbers follow the entry order: sorted by name, the module tree's files
// (and their load list and release) after the rest.
//
// It runs on the build host only.
package image

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/unlockrd/unlockrd/initramfs/ulog"

	"github.com/u-root/mkuimage/cpio"

	"github.com/unlockrd/unlockrd/initramfs/config"
	"github.com/unlockrd/unlockrd/initramfs/host/kmod"
	"github.com/unlockrd/unlockrd/initramfs/host/yamlconfig"
	"github.com/unlockrd/unlockrd/initramfs/layout"
)

// Options are the inputs of Build. Nothing else is read: not the
// environment, not the working directory beyond resolving these paths.
type Options struct {
	// ConfigFile is the YAML configuration (DESIGN §3). Errors name it
	// as given, then the field.
	ConfigFile string
	// ModulesDir is the kernel's module tree, /lib/modules/<release>. It
	// may be empty only when the configuration lists no modules.
	ModulesDir string
	// Init is the unlockrd-init binary, a static executable.
	Init string
	// Output is the image file; it is replaced only once the new image is
	// complete.
	Output string
	// Compression defaults to DefaultCompression.
	Compression Compression
	// MTime is the time stamp of every entry, in seconds since 1970:
	// SOURCE_DATE_EPOCH when set (see ParseSourceDateEpoch), else 0.
	MTime int64
	// Logger gets notes; nil discards them.
	Logger ulog.Logger
	// Mke2fs is the mke2fs carried when a volume says provision (with its
	// shared libraries); "" looks in /usr/sbin and /sbin.
	Mke2fs string
	// TestFaults marks the image for fault-injection tests
	// (layout.TestFaultsPath): only then does the init honour
	// rd.unlockrd.test-poweroff-at=. Never for production images.
	TestFaults bool
}

// Report describes a built image.
type Report struct {
	Output      string
	Release     string
	Compression Compression
	// Compressor names the external program that compressed the image
	// ("xz (XZ Utils) 5.4.1"), "" for the built-in compressors: the bytes
	// of an image depend on its version.
	Compressor string
	Modules    []kmod.Module
	// Sizes in bytes: the init binary, the module files (uncompressed), the
	// configuration, the whole cpio archive, and the image file.
	InitSize, ModulesSize, ConfigSize int64
	Uncompressed, Compressed          int64
}

// ParseSourceDateEpoch reads a SOURCE_DATE_EPOCH value
// (reproducible-builds.org): "" is 0; anything else must be a whole number
// of seconds that fits a cpio time stamp.
func ParseSourceDateEpoch(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v < 0 || v > math.MaxUint32 {
		return 0, fmt.Errorf("SOURCE_DATE_EPOCH=%q: want seconds since 1970, from 0 to %d", s, uint32(math.MaxUint32))
	}
	return v, nil
}

// entry is one record of the archive before it is written.
type entry struct {
	name           string
	mode           uint64 // with the file type bits
	rmajor, rminor uint64
	// data returns a regular file's contents when the record is written,
	// so that only one module is in memory at a time.
	data func() ([]byte, error)
	size *int64 // where to add the file's size for the report
}

// Build writes the image described by o and reports its sizes. On error no
// image is written and an existing Output is left alone.
func Build(ctx context.Context, o Options) (*Report, error) {
	log := o.Logger
	if log == nil {
		log = ulog.Null
	}
	comp, err := ParseCompression(string(o.Compression))
	if err != nil {
		return nil, err
	}
	if o.MTime < 0 || o.MTime > math.MaxUint32 {
		return nil, fmt.Errorf("time stamp %d does not fit a cpio archive", o.MTime)
	}
	if o.Output == "" {
		return nil, errors.New("no output file")
	}
	rep := &Report{Output: o.Output, Compression: comp}

	cfgYAML, err := os.ReadFile(o.ConfigFile)
	if err != nil {
		return nil, fmt.Errorf("configuration: %w", err)
	}
	cfg, err := yamlconfig.Parse(cfgYAML)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", o.ConfigFile, err)
	}
	cfgJSON, err := cfg.Embed()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", o.ConfigFile, err)
	}
	// A missing external compressor fails the build before the module
	// tree is read, naming the packages that provide it.
	if rep.Compressor, err = CompressorVersion(comp); err != nil {
		return nil, err
	}

	initBin, err := os.ReadFile(o.Init)
	if err != nil {
		return nil, fmt.Errorf("init binary: %w", err)
	}
	initMachine, err := checkInit(initBin)
	if err != nil {
		return nil, fmt.Errorf("init binary %s: %w", o.Init, err)
	}

	// The module closure is resolved while the rest of the archive is
	// compressed: for a tree without modules.dep it scans every module's
	// .modinfo (seconds of CPU for Debian 13's .ko.xz tree), and the
	// compressor, one goroutine for reproducible output, leaves the other
	// cores idle meanwhile. Module files come last in the archive for
	// this; the order is still fixed by the inputs alone.
	var mods <-chan modulesResult
	switch {
	case o.ModulesDir != "":
		ch := make(chan modulesResult, 1)
		go func() { ch <- resolveModules(o.ModulesDir, o.ConfigFile, cfg, log) }()
		mods = ch
	case len(cfg.Modules) > 0:
		return nil, fmt.Errorf("%s: modules: %d modules listed but no module tree given", o.ConfigFile, len(cfg.Modules))
	}

	entries := []entry{
		{name: layout.InitPath, mode: cpio.S_IFREG | 0o755, data: static(initBin), size: &rep.InitSize},
		{name: layout.ConfigPath, mode: cpio.S_IFREG | 0o644, data: static(cfgJSON), size: &rep.ConfigSize},
		{name: "dev/console", mode: cpio.S_IFCHR | 0o600, rmajor: 5, rminor: 1},
	}
	for _, d := range []string{"dev", "proc", "sys", "run", "sysroot", "etc"} {
		entries = append(entries, entry{name: d, mode: cpio.S_IFDIR | 0o755})
	}
	entries = append(entries, entry{name: "tmp", mode: cpio.S_IFDIR | 0o1777})
	if cfg.NeedsMkfs() {
		files, err := mke2fsFiles(o.Mke2fs)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", o.ConfigFile, err)
		}
		for _, f := range files {
			entries = append(entries, entry{name: f.image, mode: cpio.S_IFREG | f.mode, data: readFile(f.host)})
		}
	}
	if o.TestFaults {
		log.Printf("warning: --test-faults: this image powers the machine off when rd.unlockrd.test-poweroff-at= says so; for tests only")
		entries = append(entries, entry{name: layout.TestFaultsPath, mode: cpio.S_IFREG | 0o644, data: static([]byte("fault injection enabled\n"))})
	}
	head := withParents(entries, nil)

	// moduleEntries waits for the closure and returns the archive's tail:
	// the module files, their load list and the release.
	moduleEntries := func() ([]entry, error) {
		if mods == nil {
			return nil, nil
		}
		r := <-mods
		mods = nil
		if r.err != nil {
			return nil, r.err
		}
		if m := r.tree.Machine(); m != 0 && m != initMachine {
			return nil, fmt.Errorf("init binary %s is for %v but the modules in %s are for %v", o.Init, initMachine, o.ModulesDir, m)
		}
		rep.Release, rep.Modules = r.tree.Release(), r.mods
		var tail []entry
		list := make([]layout.Module, 0, len(r.mods))
		compressed := false
		for _, m := range r.mods {
			m := m
			p := path.Join(layout.ModulesRoot, rep.Release, kmod.StripCompression(m.Path))
			compressed = compressed || p != path.Join(layout.ModulesRoot, rep.Release, m.Path)
			list = append(list, layout.Module{Name: m.Name, Path: p, Deps: m.Deps, Optional: m.Optional})
			tail = append(tail, entry{
				name: p, mode: cpio.S_IFREG | 0o644, size: &rep.ModulesSize,
				data: func() ([]byte, error) { return r.tree.ReadModule(m) },
			})
		}
		// Compressed modules are decompressed at build time, whatever the
		// kernel could load. The image is compressed as a whole, and plain
		// modules compress better in it than modules compressed one by one
		// (measured, Debian 12's 19 default modules in an xz image: 618 KB
		// plain, 659 KB as .ko.xz); and loading a compressed module needs
		// CONFIG_MODULE_DECOMPRESS, which many kernels (Debian's) lack.
		if compressed {
			log.Printf("modules are stored uncompressed: the image is compressed as a whole, where plain modules compress better than compressed ones, and the kernel need not have CONFIG_MODULE_DECOMPRESS")
		}
		listJSON, err := layout.EncodeModules(list)
		if err != nil {
			return nil, err
		}
		tail = append(tail,
			entry{name: layout.ModulesPath, mode: cpio.S_IFREG | 0o644, data: static(listJSON)},
			entry{name: layout.ReleasePath, mode: cpio.S_IFREG | 0o644, data: static(layout.EncodeRelease(rep.Release))},
		)
		return withParents(tail, head), nil
	}

	err = WriteAtomically(ctx, o.Output, func(w io.Writer) error {
		return writeArchive(ctx, w, head, moduleEntries, comp, uint64(o.MTime), &rep.Uncompressed)
	})
	if mods != nil {
		// The archive failed before it needed the modules: their error,
		// if any, is the better one to report (it comes first in the
		// configuration).
		if r := <-mods; r.err != nil {
			return nil, r.err
		}
	}
	if err != nil {
		return nil, err
	}
	st, err := os.Stat(o.Output)
	if err != nil {
		return nil, err
	}
	rep.Compressed = st.Size()
	return rep, nil
}

// modulesResult is the module tree and the resolved closure, or why not.
type modulesResult struct {
	tree *kmod.Tree
	mods []kmod.Module
	err  error
}

// resolveModules opens the module tree and resolves the configured modules.
func resolveModules(dir, configFile string, cfg *config.Config, log ulog.Logger) modulesResult {
	tree, err := kmod.Open(dir)
	if err != nil {
		return modulesResult{err: err}
	}
	tree.SetLogger(log)
	mods, err := closure(tree, cfg.Modules, cfg.NoCipherAcceleration, log)
	if err != nil {
		return modulesResult{err: fmt.Errorf("%s: %w", configFile, err)}
	}
	return modulesResult{tree: tree, mods: mods}
}

// closure resolves the configured modules. By default it carries the
// architecture's accelerated cipher drivers as optional modules (kmod's
// dm_crypt implications); no_cipher_acceleration leaves them out, with a
// warning saying what that costs, and contradicts listing one of them.
func closure(tree *kmod.Tree, names []string, noAccel bool, log ulog.Logger) ([]kmod.Module, error) {
	if !noAccel {
		mods, err := tree.Closure(names)
		if err != nil {
			return nil, fmt.Errorf("modules: %w", err)
		}
		return mods, nil
	}
	for i, n := range names {
		if kmod.IsAcceleration(n) {
			return nil, fmt.Errorf("modules[%d]: %s is an accelerated cipher driver, and no_cipher_acceleration is set: drop one or the other", i, n)
		}
	}
	accel, err := tree.Accelerations(names)
	if err != nil {
		return nil, fmt.Errorf("modules: %w", err)
	}
	mods, err := tree.ClosureWith(names, kmod.Options{NoAcceleration: true})
	if err != nil {
		return nil, fmt.Errorf("modules: %w", err)
	}
	if len(accel) > 0 {
		log.Printf("warning: no_cipher_acceleration: leaving out %s: every dm-crypt mapping keeps the generic AES code for its whole life, "+
			"an order of magnitude slower I/O on CPUs that have the instructions (saves their crypto self-tests at boot: "+
			"milliseconds natively, seconds under emulation)", strings.Join(accel, ", "))
	}
	return mods, nil
}

func readFile(path string) func() ([]byte, error) {
	return func() ([]byte, error) { return os.ReadFile(path) }
}

func static(b []byte) func() ([]byte, error) {
	return func() ([]byte, error) { return b, nil }
}

// checkInit refuses what the kernel could not run as PID 1 of this image:
// a non-ELF file, or a dynamically linked one (the image has no libraries,
// and the kernel's "No working init found" would not say why).
func checkInit(b []byte) (elf.Machine, error) {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return 0, fmt.Errorf("not an ELF executable: %w", err)
	}
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return 0, fmt.Errorf("not an executable (ELF type %v)", f.Type)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return 0, errors.New("dynamically linked: the image has no shared libraries (build it with CGO_ENABLED=0)")
		}
	}
	return f.Machine, nil
}

// withParents adds a directory entry for every parent of every entry that
// is neither among them nor in before (entries written earlier), and sorts:
// a parent path sorts before its children, so the kernel creates each
// directory before what is in it.
func withParents(entries, before []entry) []entry {
	have := map[string]bool{}
	for _, e := range before {
		have[e.name] = true
	}
	for _, e := range entries {
		have[e.name] = true
	}
	for _, e := range entries {
		for d := path.Dir(e.name); d != "."; d = path.Dir(d) {
			if !have[d] {
				have[d] = true
				entries = append(entries, entry{name: d, mode: cpio.S_IFDIR | 0o755})
			}
		}
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].name < entries[j].name })
	return entries
}

// writeArchive writes the cpio archive through the compressor, counting the
// uncompressed bytes.
// The entries are head, then what tail returns: tail is called once head is
// written (it may wait for work done meanwhile).
func writeArchive(ctx context.Context, w io.Writer, head []entry, tail func() ([]entry, error), comp Compression, mtime uint64, uncompressed *int64) (err error) {
	zw, err := compressor(w, comp)
	if err != nil {
		return err
	}
	defer func() {
		if a, ok := zw.(aborter); ok && err != nil {
			a.abort()
		}
	}()
	cw := &countingWriter{w: zw}
	rw := cpio.Newc.Writer(cw)
	entries := head
	for i := 0; ; i++ {
		if i == len(entries) && tail != nil {
			more, err := tail()
			if err != nil {
				return err
			}
			entries, tail = append(slices.Clip(entries), more...), nil
		}
		if i == len(entries) {
			break
		}
		e := entries[i]
		if err := ctx.Err(); err != nil {
			return err
		}
		info := cpio.Info{
			Ino:    uint64(i + 1),
			Mode:   e.mode,
			NLink:  1,
			MTime:  mtime,
			Rmajor: e.rmajor,
			Rminor: e.rminor,
			Name:   e.name,
		}
		if e.mode&cpio.S_IFMT == cpio.S_IFDIR {
			info.NLink = 2
		}
		rec := cpio.Record{Info: info}
		if e.data != nil {
			b, err := e.data()
			if err != nil {
				return err
			}
			if int64(len(b)) > math.MaxUint32 {
				return fmt.Errorf("%s: %d bytes do not fit a cpio archive", e.name, len(b))
			}
			rec = cpio.StaticRecord(b, info)
			if e.size != nil {
				*e.size += int64(len(b))
			}
		}
		if err := rw.WriteRecord(rec); err != nil {
			return fmt.Errorf("writing %s: %w", e.name, err)
		}
	}
	if err := cpio.WriteTrailer(rw); err != nil {
		return fmt.Errorf("writing the cpio trailer: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("compressing: %w", err)
	}
	*uncompressed = cw.n
	return nil
}

// WriteAtomically writes through a temporary file beside out and renames
// it over out only when write succeeded: a failed or interrupted build
// leaves no image, and never a truncated one.
func WriteAtomically(ctx context.Context, out string, write func(io.Writer) error) (err error) {
	dir, base := filepath.Split(out)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("output: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	// The compressors write in small pieces.
	bw := bufio.NewWriterSize(f, 1<<20)
	if err := write(bw); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("output %s: %w", out, err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	// CreateTemp makes 0600 files; an image is not secret, and its mode
	// should not depend on the builder's umask.
	if err := f.Chmod(0o644); err != nil {
		return fmt.Errorf("output %s: %w", out, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("output %s: %w", out, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("output %s: %w", out, err)
	}
	if err := os.Rename(f.Name(), out); err != nil {
		return fmt.Errorf("output: %w", err)
	}
	return nil
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// FormatSize prints a byte count for the size table: exact bytes and a
// rounded binary unit.
func FormatSize(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%d (%.1f MiB)", n, float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%d (%.1f KiB)", n, float64(n)/(1<<10))
	}
	return strconv.FormatInt(n, 10) + " B"
}
