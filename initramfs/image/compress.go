package image

import (
	"bufio"
	"bytes"
	"fmt"
	"io"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// Compression is how the whole cpio archive is compressed. The kernel
// decompresses it itself (CONFIG_RD_ZSTD, CONFIG_RD_GZIP), so no
// decompressor needs to be in the image.
type Compression string

// The supported compressions. Zstd is the default: it decompresses several
// times faster than gzip at boot, and is smaller.
const (
	Zstd Compression = "zstd"
	Gzip Compression = "gzip"
	None Compression = "none"
)

// ParseCompression checks a --compress value; "" means Zstd.
func ParseCompression(s string) (Compression, error) {
	switch c := Compression(s); c {
	case "":
		return Zstd, nil
	case Zstd, Gzip, None:
		return c, nil
	}
	return "", fmt.Errorf("compression %q: want zstd, gzip or none", s)
}

// compressor wraps w. Every setting that could make two runs differ is
// pinned: one encoder goroutine (a concurrent encoder splits the input
// depending on scheduling), no file name or time in the gzip header.
func compressor(w io.Writer, c Compression) (io.WriteCloser, error) {
	switch c {
	case Zstd:
		// SpeedBestCompression is the strongest level klauspost offers and
		// still compresses a typical image (10-30 MB) in about a second;
		// the default 8 MiB window is well within what the kernel's
		// decompressor accepts.
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
	return nil, fmt.Errorf("compression %q: want zstd, gzip or none", c)
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
	cpioMagic = []byte("070701")
)

// decompressor detects the compression by its magic number, as the kernel
// does, rather than trusting a file name.
func decompressor(r io.Reader) (io.Reader, Compression, func(), error) {
	br := bufio.NewReader(r)
	head, _ := br.Peek(6)
	switch {
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
	return nil, "", nil, fmt.Errorf("not an initramfs image: unknown magic %x (want zstd, gzip or a newc cpio archive)", head)
}
