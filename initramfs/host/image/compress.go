package image

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// Compression is how the whole cpio archive is compressed. The kernel
// decompresses it itself (CONFIG_RD_XZ, CONFIG_RD_ZSTD, CONFIG_RD_GZIP: all
// three are set in the kernels of every major distribution), so no
// decompressor needs to be in the image.
type Compression string

// The supported compressions.
//
// Zstd is the default (as in Debian's initramfs-tools) because it boots
// the default image soonest: the kernel unpacks the image before it runs
// /init, and its zstd decoder is several times faster than its xz decoder
// (`make bench` boots all three alternately on Debian 12's and 13's
// kernels; natively the difference is about 0.1 s for an 11 MB archive,
// under QEMU's TCG it is inflated to most of a second). The price is size:
// with the default modules and the AES-NI drivers zstd (Go encoder, its
// strongest level) makes 3.55 MB on Debian 12's kernel and 3.62 MB on
// Debian 13's, xz 2.90 and 2.93 MB, gzip 3.88 and 3.94 MB; all within the
// 4 MB target. The extra 0.65 MB costs milliseconds to load from a disk or
// over HTTP; only a slow TFTP transfer makes xz the better choice, and xz
// remains available for that (--compress xz, needs the xz program).
const (
	Xz   Compression = "xz"
	Zstd Compression = "zstd"
	Gzip Compression = "gzip"
	None Compression = "none"
)

// DefaultCompression is what an empty Compression means.
const DefaultCompression = Zstd

// Compressions lists the accepted values, for usage messages.
const Compressions = "xz, zstd, gzip or none"

// ParseCompression checks a --compress value; "" means DefaultCompression.
func ParseCompression(s string) (Compression, error) {
	switch c := Compression(s); c {
	case "":
		return DefaultCompression, nil
	case Xz, Zstd, Gzip, None:
		return c, nil
	}
	return "", fmt.Errorf("compression %q: want %s", s, Compressions)
}

// xzArgs are the xz(1) options of an image. The kernel's xz decoder
// (lib/xz) accepts only the CRC32 check or none (xz's default CRC64 makes
// the kernel refuse the image) and only the LZMA2 and BCJ filters. Preset 6
// (an 8 MiB dictionary) compresses this kind of archive as well as 9e with
// a 16 MiB one (measured: within 0.1%) and the kernel then allocates half
// the memory to decompress it. One thread: xz's multi-threaded mode splits
// the input into blocks, which is both larger and a different output.
// x86 BCJ is left out: it saves 1.5% here and costs decompression time.
var xzArgs = []string{"--format=xz", "--check=crc32", "--lzma2=preset=6", "--threads=1", "--stdout", "--quiet"}

// compressor wraps w. Every setting that could make two runs differ is
// pinned: one encoder goroutine (a concurrent encoder splits the input
// depending on scheduling), no file name or time in the gzip header, no
// environment for xz (XZ_DEFAULTS and XZ_OPT would change its options).
func compressor(w io.Writer, c Compression) (io.WriteCloser, error) {
	switch c {
	case Xz:
		return startXZ(w)
	case Zstd:
		// SpeedBestCompression is the strongest level klauspost offers;
		// a larger window than the default 8 MiB gains nothing on images
		// of this size (measured).
		return zstd.NewWriter(w,
			zstd.WithEncoderLevel(zstd.SpeedBestCompression),
			zstd.WithEncoderConcurrency(1),
			zstd.WithEncoderCRC(true))
	case Gzip:
		zw, err := gzip.NewWriterLevel(w, gzip.BestCompression)
		if err != nil {
			return nil, err
		}
		zw.Header = gzip.Header{OS: 255}
		return zw, nil
	case None:
		return nopCloser{w}, nil
	}
	return nil, fmt.Errorf("compression %q: want %s", c, Compressions)
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// aborter is a compressor that holds resources beyond memory (a child
// process) and must be stopped when the archive is abandoned.
type aborter interface{ abort() }

// ErrNoXZ is wrapped by the error of an xz build on a machine without the
// xz program.
var ErrNoXZ = errors.New("the xz program is not installed")

// xzPath finds xz(1) and names the packages that provide it when absent.
func xzPath() (string, error) {
	p, err := exec.LookPath("xz")
	if err != nil {
		return "", fmt.Errorf("compression xz: %w (Debian/Ubuntu: apt install xz-utils; Fedora/RHEL: dnf install xz); or build with --compress zstd, which needs no external program", ErrNoXZ)
	}
	return p, nil
}

func xzVersion() (string, error) {
	p, err := xzPath()
	if err != nil {
		return "", err
	}
	cmd := exec.Command(p, "--version")
	cmd.Env = []string{"LC_ALL=C"}
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", p, err)
	}
	first, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(first), nil
}

// CompressorVersion names the program that compresses with c when it is
// an external one ("xz (XZ Utils) 5.4.1"), and "" otherwise. The bytes of
// an xz image are the same for the same inputs and the same xz version.
func CompressorVersion(c Compression) (string, error) {
	if c == Xz {
		return xzVersion()
	}
	return "", nil
}

// xzWriter pipes the archive through xz(1).
type xzWriter struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stderr bytes.Buffer
	failed error
}

func startXZ(w io.Writer) (*xzWriter, error) {
	p, err := xzPath()
	if err != nil {
		return nil, err
	}
	x := &xzWriter{cmd: exec.Command(p, xzArgs...)}
	x.cmd.Env = []string{"LC_ALL=C"}
	x.cmd.Stdout = w
	x.cmd.Stderr = &x.stderr
	if x.stdin, err = x.cmd.StdinPipe(); err != nil {
		return nil, fmt.Errorf("compression xz: %w", err)
	}
	if err := x.cmd.Start(); err != nil {
		return nil, fmt.Errorf("compression xz: %s: %w", p, err)
	}
	return x, nil
}

func (x *xzWriter) Write(b []byte) (int, error) {
	if x.failed != nil {
		return 0, x.failed
	}
	n, err := x.stdin.Write(b)
	if err != nil {
		// xz exited early: its own message says why.
		x.stdin.Close()
		werr := x.cmd.Wait()
		x.failed = fmt.Errorf("compression xz: %v (%v): %s", err, werr, strings.TrimSpace(x.stderr.String()))
		return n, x.failed
	}
	return n, nil
}

// Close ends xz's input and waits until it has written all its output.
func (x *xzWriter) Close() error {
	if x.failed != nil {
		return x.failed
	}
	x.stdin.Close()
	if err := x.cmd.Wait(); err != nil {
		return fmt.Errorf("compression xz: %w: %s", err, strings.TrimSpace(x.stderr.String()))
	}
	return nil
}

func (x *xzWriter) abort() {
	if x.failed != nil {
		return
	}
	x.failed = errors.New("compression xz: aborted")
	x.stdin.Close()
	_ = x.cmd.Process.Kill()
	_ = x.cmd.Wait()
}

var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
	xzMagic   = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}
	cpioMagic = []byte("070701")
)

// decompressor detects the compression by its magic number, as the kernel
// does, rather than trusting a file name.
func decompressor(r io.Reader) (io.Reader, Compression, func(), error) {
	br := bufio.NewReader(r)
	head, _ := br.Peek(6)
	switch {
	case bytes.HasPrefix(head, xzMagic):
		// Reading needs no xz program: the Go decoder handles what the
		// kernel's handles (LZMA2, CRC32).
		zr, err := xz.NewReader(br)
		if err != nil {
			return nil, "", nil, fmt.Errorf("xz: %w", err)
		}
		return zr, Xz, func() {}, nil
	case bytes.HasPrefix(head, zstdMagic):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, "", nil, fmt.Errorf("zstd: %w", err)
		}
		return zr, Zstd, zr.Close, nil
	case bytes.HasPrefix(head, gzipMagic):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, "", nil, fmt.Errorf("gzip: %w", err)
		}
		return zr, Gzip, func() { zr.Close() }, nil
	case bytes.HasPrefix(head, cpioMagic):
		return br, None, func() {}, nil
	}
	return nil, "", nil, fmt.Errorf("not an initramfs image: unknown magic %x (want xz, zstd, gzip or a newc cpio archive)", head)
}
