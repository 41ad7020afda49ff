package image

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The kernel's xz decoder refuses xz's default CRC64 check and any filter
// but LZMA2 and BCJ: the stream must say CRC32, its one block LZMA2 alone.
// (TestQEMUBoot shows the kernel unpacking it.)
func TestXZStreamForTheKernel(t *testing.T) {
	dir := t.TempDir()
	cfg := writeConfig(t, dir, strings.Replace(goodConfig, "modules: [virtio_pci, virtio_blk, virtio_net, dm_crypt, ext4]\n", "", 1))
	out := filepath.Join(dir, "x.img")
	rep := build(t, Options{ConfigFile: cfg, Init: smokeInit(t), Output: out, Compression: Xz})
	if !strings.HasPrefix(rep.Compressor, "xz (XZ Utils) ") {
		t.Errorf("Compressor = %q, want xz's version line", rep.Compressor)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	// Stream header: magic, flags 0x00 0x01 (CRC32). Block header: size
	// byte, flags (number of filters - 1 in the low bits), then the first
	// filter ID (0x21, LZMA2).
	if !bytes.HasPrefix(b, xzMagic) || b[6] != 0 || b[7] != 0x01 {
		t.Fatalf("stream header % x: want CRC32 (flags 00 01)", b[:12])
	}
	if blk := b[12:]; blk[1]&0x03 != 0 || blk[2] != 0x21 {
		t.Errorf("block header % x: want one filter, LZMA2", blk[:8])
	}
	c, err := ReadFile(out)
	if err != nil || c.Compression != Xz {
		t.Fatalf("reading back: %v, %v", c, err)
	}
}

// Neither XZ_DEFAULTS nor XZ_OPT change the image: xz would read them.
func TestXZIgnoresEnvironment(t *testing.T) {
	dir := t.TempDir()
	cfg := writeConfig(t, dir, strings.Replace(goodConfig, "modules: [virtio_pci, virtio_blk, virtio_net, dm_crypt, ext4]\n", "", 1))
	o := Options{ConfigFile: cfg, Init: smokeInit(t), Compression: Xz}
	o.Output = filepath.Join(dir, "a.img")
	build(t, o)
	t.Setenv("XZ_DEFAULTS", "-1e --check=crc64")
	t.Setenv("XZ_OPT", "-0 -T4")
	o.Output = filepath.Join(dir, "b.img")
	build(t, o)
	a, _ := os.ReadFile(filepath.Join(dir, "a.img"))
	b, _ := os.ReadFile(filepath.Join(dir, "b.img"))
	if !bytes.Equal(a, b) {
		t.Error("XZ_DEFAULTS/XZ_OPT changed the image")
	}
}

// Without the xz program an xz build fails at once, naming the package,
// and writes nothing; zstd still works.
func TestXZMissing(t *testing.T) {
	dir := t.TempDir()
	cfg := writeConfig(t, dir, strings.Replace(goodConfig, "modules: [virtio_pci, virtio_blk, virtio_net, dm_crypt, ext4]\n", "", 1))
	init := smokeInit(t)
	t.Setenv("PATH", t.TempDir())
	_, err := Build(context.Background(), Options{ConfigFile: cfg, Init: init, Output: filepath.Join(dir, "x.img"), Compression: Xz})
	if !errors.Is(err, ErrNoXZ) || !strings.Contains(err.Error(), "xz-utils") || !strings.Contains(err.Error(), "--compress zstd") {
		t.Fatalf("err = %v", err)
	}
	assertFiles(t, dir, "unlockrd.yaml")
	if _, err := Build(context.Background(), Options{ConfigFile: cfg, Init: init, Output: filepath.Join(dir, "z.img"), Compression: Zstd}); err != nil {
		t.Errorf("zstd without xz: %v", err)
	}
}
