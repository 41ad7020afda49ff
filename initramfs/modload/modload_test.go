package modload

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/layout"
	"github.com/unlockrd/unlockrd/initramfs/ulog"

	"golang.org/x/sys/unix"
)

// recorder loads nothing but records order, and checks every dependency
// finished before its dependent started (the kernel's ENOENT trap).
type recorder struct {
	mu     sync.Mutex
	done   map[string]bool
	order  []string
	deps   map[string][]string
	fail   map[string]error
	broken []string
}

func (r *recorder) load(path string) error {
	name := strings.TrimSuffix(filepath.Base(path), ".ko")
	r.mu.Lock()
	for _, d := range r.deps[name] {
		if !r.done[d] {
			r.broken = append(r.broken, name+" before "+d)
		}
	}
	r.mu.Unlock()
	time.Sleep(time.Millisecond)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.order = append(r.order, name)
	if err := r.fail[name]; err != nil {
		return err
	}
	r.done[name] = true
	return nil
}

func mods() []layout.Module {
	return []layout.Module{
		{Name: "virtio", Path: "virtio.ko"},
		{Name: "virtio_ring", Path: "virtio_ring.ko", Deps: []string{"virtio"}},
		{Name: "virtio_pci", Path: "virtio_pci.ko", Deps: []string{"virtio", "virtio_ring"}},
		{Name: "virtio_blk", Path: "virtio_blk.ko", Deps: []string{"virtio", "virtio_ring"}},
		{Name: "mbcache", Path: "mbcache.ko"},
		{Name: "crc32c_intel", Path: "crc32c_intel.ko", Optional: true},
		{Name: "crc32c_generic", Path: "crc32c_generic.ko", Optional: true},
		{Name: "ext4", Path: "ext4.ko", Deps: []string{"crc32c_generic", "crc32c_intel", "mbcache"}},
	}
}

func newRecorder(ms []layout.Module) *recorder {
	r := &recorder{done: map[string]bool{}, deps: map[string][]string{}, fail: map[string]error{}}
	for _, m := range ms {
		r.deps[m.Name] = m.Deps
	}
	return r
}

func TestDependenciesFirst(t *testing.T) {
	ms := mods()
	r := newRecorder(ms)
	res, err := Load(context.Background(), "/", ms, r.load, ulog.Null)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.broken) > 0 {
		t.Fatalf("loaded before dependency: %v", r.broken)
	}
	if res.Loaded != len(ms) {
		t.Fatalf("loaded %d of %d", res.Loaded, len(ms))
	}
}

func TestOptionalFailureTolerated(t *testing.T) {
	ms := mods()
	r := newRecorder(ms)
	r.fail["crc32c_intel"] = unix.ENODEV
	r.deps["ext4"] = []string{"crc32c_generic"} // checked: generic must be loaded
	res, err := Load(context.Background(), "/", ms, r.load, ulog.Null)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Failed) != 1 || res.Failed[0] != "crc32c_intel" || !strings.Contains(res.String(), "optional failed: crc32c_intel") {
		t.Fatalf("res = %+v", res)
	}
}

func TestRequiredFailureNamesModuleAndSkipsDependents(t *testing.T) {
	ms := mods()
	r := newRecorder(ms)
	r.fail["virtio_ring"] = unix.ENOENT
	_, err := Load(context.Background(), "/", ms, r.load, ulog.Null)
	if err == nil || !strings.Contains(err.Error(), "module virtio_ring") || !errors.Is(err, unix.ENOENT) {
		t.Fatalf("err = %v", err)
	}
	for _, n := range r.order {
		if n == "virtio_pci" || n == "virtio_blk" {
			t.Fatalf("%s was attempted after its dependency failed", n)
		}
	}
}

func TestAlreadyLoadedCounts(t *testing.T) {
	ms := mods()[:1]
	r := newRecorder(ms)
	r.fail["virtio"] = unix.EEXIST
	res, err := Load(context.Background(), "/", ms, r.load, ulog.Null)
	if err != nil || res.Present != 1 {
		t.Fatalf("res=%+v err=%v", res, err)
	}
}
