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
