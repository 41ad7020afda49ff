// Package imagetest is test support for the image builder and the tools
// that use it: a small static init to put in test images, configuration
// files, and folder assertions.
package imagetest

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
)

// GoodConfig is a valid builder configuration.
const GoodConfig = `key:
  urls:
    - https://keys-a.example.net:8443/v1/keys/{host}
  pins:
    - sha256//7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y=
  host: smbios-uuid
  token: credential
root:
  device: PARTLABEL=root
  fstype: ext4
volumes:
  - name: data
    device: PARTLABEL=data
    mount: /var/lib/postgresql
    fstype: ext4
  - name: swap
    device: PARTLABEL=swap
    swap: true
modules: [virtio_pci, virtio_blk, virtio_net, dm_crypt, ext4]
`

// BadConfigs are configurations that must stop a build, and the field the
// error must name.
var BadConfigs = []struct{ Name, YAML, Field string }{
	{"unknown key", strings.Replace(GoodConfig, "  host: smbios-uuid\n", "  host: smbios-uuid\n  hots: x\n", 1), "key.hots"},
	{"missing field", strings.Replace(GoodConfig, "  device: PARTLABEL=root\n", "", 1), "root.device"},
	{"malformed pin", strings.Replace(GoodConfig, "7HIpactkIAq2Y49orFOOQKurWxmmSFZhBCoQYcRhJ3Y=", "not-base64!", 1), "key.pins[0]: malformed pin"},
}

// WriteConfig writes text as dir/unlockrd.yaml and returns its path.
func WriteConfig(t testing.TB, dir, text string) string {
	t.Helper()
	p := filepath.Join(dir, "unlockrd.yaml")
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// AssertFiles fails t unless dir holds exactly the files named.
func AssertFiles(t testing.TB, dir string, want ...string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	got := []string{}
	for _, e := range ents {
		got = append(got, e.Name())
	}
	want = append([]string{}, want...)
	sort.Strings(want)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s holds %v, want %v", dir, got, want)
	}
}

var smoke = sync.OnceValues(buildSmokeInit)

// SmokeInit builds smokeinit, a small static init that loads the image's
// modules and powers off, once per test process, and returns its path. The
// binary lives in the OS temporary folder until the process ends; the Go
// build cache makes rebuilding it cheap.
func SmokeInit(t testing.TB) string {
	t.Helper()
	p, err := smoke()
	if err != nil {
		t.Fatalf("building the smoke init: %v", err)
	}
	return p
}

func buildSmokeInit() (string, error) {
	_, self, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("imagetest: no source path")
	}
	dir, err := os.MkdirTemp("", "unlockrd-smokeinit-")
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "init")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w -buildid=", "-o", out, "./smokeinit")
	cmd.Dir = filepath.Dir(self)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", errors.New(string(b))
	}
	return out, nil
}
