package image

import (
	"path"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/initramfs/layout"
)

// The build host's mke2fs comes with its loader and every library it
// needs (Debian 12: libext2fs, libcom_err, libblkid, libuuid, libe2p,
// libc), the loader once.
func TestMke2fsFilesClosure(t *testing.T) {
	files, err := mke2fsFiles("")
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]int{}
	for _, f := range files {
		names[path.Base(f.image)]++
	}
	if files[0].image != layout.Mke2fsPath {
		t.Errorf("first file %s, want %s", files[0].image, layout.Mke2fsPath)
	}
	for _, want := range []string{"libext2fs.so.2", "libcom_err.so.2", "libblkid.so.1", "libuuid.so.1", "libe2p.so.2", "libc.so.6", "ld-linux-x86-64.so.2"} {
		if names[want] != 1 {
			t.Errorf("%s carried %d times, want once (files %v)", want, names[want], files)
		}
	}
	if _, err := mke2fsFiles("/nonexistent/mke2fs"); err == nil || !strings.Contains(err.Error(), "/nonexistent/mke2fs") {
		t.Errorf("missing mke2fs: %v", err)
	}
}
