package kmod

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// modinfo is what the build needs from a module's .modinfo section, the
// NUL-separated key=value strings that modinfo(8) prints.
type modinfo struct {
	depends  []string
	soft     softdep
	aliases  []string
	vermagic string
	machine  elf.Machine
}

// readModinfoFile reads the .modinfo section of a module file. An
// uncompressed module is read in place (ELF header, section table, the
// section itself): scanning every module of a tree for aliases stays a
// matter of a second. A compressed one has to be decompressed whole, as its
// section table sits at the end.
func readModinfoFile(p string) (*modinfo, error) {
	var (
		mi  *modinfo
		err error
	)
	if strings.HasSuffix(p, ".ko") {
		var f *os.File
		if f, err = os.Open(p); err != nil {
			return nil, err
		}
		defer f.Close()
		mi, err = parseELF(f)
	} else {
		var b []byte
		if b, err = readFile(p); err != nil {
			return nil, err
		}
		mi, err = parseELF(bytes.NewReader(b))
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	return mi, nil
}

func parseELF(r io.ReaderAt) (*modinfo, error) {
	ef, err := elf.NewFile(r)
	if err != nil {
		return nil, fmt.Errorf("not an ELF module: %w", err)
	}
	sec := ef.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("no .modinfo section: not a kernel module")
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf(".modinfo section: %w", err)
	}
	mi := parseModinfo(data)
	mi.machine = ef.Machine
	return mi, nil
}

func parseModinfo(data []byte) *modinfo {
	mi := &modinfo{}
	for _, rec := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(rec), "=")
		if !ok {
			continue
		}
		switch k {
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					mi.depends = append(mi.depends, Normalize(d))
				}
			}
		case "softdep":
			mi.soft.addSpec(v)
		case "alias":
			mi.aliases = append(mi.aliases, v)
		case "vermagic":
			mi.vermagic = v
		}
	}
	return mi
}

// readFile returns a module file's contents, decompressed according to its
// name, as the kernel's own module decompression would.
func readFile(p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var r io.Reader
	switch {
	case strings.HasSuffix(p, ".ko.xz"):
		if r, err = xz.NewReader(bufio.NewReader(f)); err != nil {
			return nil, fmt.Errorf("%s: xz: %w", p, err)
		}
	case strings.HasSuffix(p, ".ko.zst"):
		zr, err := zstd.NewReader(f, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, fmt.Errorf("%s: zstd: %w", p, err)
		}
		defer zr.Close()
		r = zr
	case strings.HasSuffix(p, ".ko.gz"):
		gr, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("%s: gzip: %w", p, err)
		}
		defer gr.Close()
		r = gr
	default:
		r = f
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	return b, nil
}

// scanAliasesXZ returns the aliases of an .ko.xz module without
// decompressing all of it. The ELF section table, which says where
// .modinfo is, sits at the end of the file, after the code, but .modinfo's
// records sit near the start (2–30 % into the 6.12 modules measured). So
// the decompressed stream is scanned for the section's shape, a run of
// NUL-terminated key=value records that holds the module's own name=
// record and its vermagic=, and decoding (prefixDecoder, a step of 8 KiB
// at a time) stops once that run has ended: most of a module is never
// decoded.
//
// ok is false when no such run was found or the file is not one block of
// plain LZMA2: the caller then reads the module whole. Lookups confirm
// every provider found this way from the exact .modinfo section
// (Tree.confirm), so a record of another section that looks like an alias
// costs a read, never a wrong module.
//
// sb holds buffers reused from one call to the next (nil: fresh ones).
func scanAliasesXZ(p, name string, sb *scanBuffers) (aliases []string, ok bool, err error) {
	if sb == nil {
		sb = new(scanBuffers)
	}
	b, err := readPadded(p, lzmaPad, sb.file[:0])
	if err != nil {
		return nil, false, err
	}
	sb.file = b
	d := &sb.d
	if !d.init(b) {
		return nil, false, nil
	}
	var run runState
	nameRec := "name=" + name
	start := 0 // first byte of the record being read
	for step := 8 << 10; ; step += 8 << 10 {
		if err := d.fill(step); err != nil {
			return nil, false, nil
		}
		for {
			i := bytes.IndexByte(d.out[start:], 0)
			if i < 0 {
				break
			}
			s := d.out[start : start+i]
			start += i + 1
			if isRecord(s) {
				run.add(s, nameRec)
				continue
			}
			if run.complete() {
				return run.aliases, true, nil
			}
			run = runState{}
		}
		if d.done || len(d.out) < step {
			if run.complete() {
				return run.aliases, true, nil
			}
			return nil, false, nil
		}
	}
}

// runState is a run of key=value records being scanned.
type runState struct {
	aliases        []string
	name, vermagic bool
}

func (r *runState) add(s []byte, nameRec string) {
	switch {
	case bytes.HasPrefix(s, []byte("alias=")):
		r.aliases = append(r.aliases, string(s[len("alias="):]))
	case bytes.HasPrefix(s, []byte("vermagic=")):
		r.vermagic = true
	case Normalize(string(s)) == nameRec:
		r.name = true
	}
}

func (r *runState) complete() bool { return r.name && r.vermagic }

// isRecord reports whether s has the shape of a .modinfo record: a
// lower-case identifier, "=", and text.
func isRecord(s []byte) bool {
	eq := bytes.IndexByte(s, '=')
	if eq < 1 {
		return false
	}
	for i, c := range s[:eq] {
		if !(c >= 'a' && c <= 'z' || c == '_' || i > 0 && c >= '0' && c <= '9') {
			return false
		}
	}
	for _, c := range s[eq+1:] {
		if c < 0x20 && c != '\t' && c != '\n' || c == 0x7f {
			return false
		}
	}
	return true
}

// xzBlockStart checks the .xz block header at b[off:] (one filter: plain
// LZMA2, as kmod and the kernel's build write modules) and returns where
// its LZMA2 data starts, or -1 for any other layout.
func xzBlockStart(b []byte, off int) int {
	if off >= len(b) || b[off] == 0 {
		return -1
	}
	hlen := (int(b[off]) + 1) * 4
	if off+hlen > len(b) {
		return -1
	}
	bh := b[off+1 : off+hlen]
	flags := bh[0]
	if flags&0x03 != 0 { // more than one filter
		return -1
	}
	rest := bh[1:]
	skipVarint := func() bool {
		for i, c := range rest {
			if c&0x80 == 0 {
				rest = rest[i+1:]
				return true
			}
		}
		return false
	}
	if flags&0x40 != 0 && !skipVarint() { // compressed size
		return -1
	}
	if flags&0x80 != 0 && !skipVarint() { // uncompressed size
		return -1
	}
	// Filter flags: id 0x21 (LZMA2), one property byte (the dictionary).
	if len(rest) < 3 || rest[0] != 0x21 || rest[1] != 1 || rest[2] > 40 {
		return -1
	}
	return off + hlen
}

// xzCheckSize is the size of a block's check for the stream flags' check
// type (xz's file format, §2.1.1.2), or -1 for a reserved one.
func xzCheckSize(flags byte) int {
	switch t := flags & 0x0f; {
	case t == 0:
		return 0
	case t <= 3:
		return 4
	case t <= 6:
		return 8
	case t <= 9:
		return 16
	case t <= 12:
		return 32
	}
	return 64
}

// scanBuffers are what one goroutine of the alias scan reuses from module
// to module: the file and the decoder (its output and literal
// probabilities). Fresh ones for each of Debian 13's 4,230 modules cost
// about a tenth of the scan's CPU in allocation, page faults and garbage
// collection.
type scanBuffers struct {
	file []byte
	d    prefixDecoder
}

// readPadded reads file p into a slice with pad bytes of spare capacity,
// which the prefix decoder uses rather than copying the file; buf's memory
// is used when it is large enough.
func readPadded(p string, pad int, buf []byte) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	b := buf[:0]
	if int64(cap(buf)) < st.Size()+int64(pad) {
		b = make([]byte, 0, st.Size()+int64(pad))
	}
	b = b[:st.Size()]
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	return b, nil
}
