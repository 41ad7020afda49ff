package volumes

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/unlockrd/unlockrd/unlock/blockdev"
	"github.com/unlockrd/unlockrd/unlock/luks2"
	"github.com/unlockrd/unlockrd/unlock/luks2/luks2test"
	"github.com/unlockrd/unlockrd/unlock/secret"
)

type stepLog struct{ steps []string }

func (s *stepLog) Step(flow, what string) { s.steps = append(s.steps, flow+": "+what) }

func opensWith(t *testing.T, img string, key []byte) bool {
	t.Helper()
	cmd := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file", "-", img)
	cmd.Stdin = strings.NewReader(string(key))
	return cmd.Run() == nil
}

// rotate on a cryptsetup volume that opens only with the old key: after
// it, cryptsetup opens it with the new key and not the old one; every
// write went through the fault hook; a second run writes nothing.
func TestRotateMovesToTheCurrentKey(t *testing.T) {
	oldKey, newKey := []byte("old passphrase of the host"), []byte("new passphrase of the host")
	img := luks2test.Format(t, oldKey)
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	h, err := luks2.ReadHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	keys := []*secret.Buf{secret.From([]byte(string(newKey))), secret.From([]byte(string(oldKey)))}
	vk, _, ki, err := luks2.FindKey(context.Background(), f, h, keys)
	f.Close()
	if err != nil || ki != 1 {
		t.Fatalf("FindKey: key %d, %v", ki, err)
	}
	defer vk.Wipe()
	p := Prepared{Spec: Spec{Name: "data", Device: "PARTLABEL=data"}, Dev: blockdev.BlockDev{Path: img}, Header: h}
	steps := &stepLog{}
	did, err := rotate(context.Background(), p, keys, vk, ki, Lifecycle{Rotating: true, Faults: steps}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(did, "added keyslot 1 for key 1") || !strings.Contains(did, "removed keyslot 0") {
		t.Errorf("did %q", did)
	}
	if !opensWith(t, img, newKey) || opensWith(t, img, oldKey) {
		t.Fatalf("after rotate: new opens %v, old opens %v", opensWith(t, img, newKey), opensWith(t, img, oldKey))
	}
	if len(steps.steps) < 4 {
		t.Errorf("only %d write steps seen by the fault hook: %v", len(steps.steps), steps.steps)
	}
	for _, s := range steps.steps {
		if !strings.HasPrefix(s, FlowRotate+": write ") {
			t.Errorf("step %q", s)
		}
	}
	// Again, as the next boot would: nothing to do, nothing written.
	f, _ = os.Open(img)
	h, err = luks2.ReadHeader(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	p.Header = h
	steps.steps = nil
	did, err = rotate(context.Background(), p, keys, vk, 0, Lifecycle{Rotating: true, Faults: steps}, Options{})
	if err != nil || did != "" || len(steps.steps) != 0 {
		t.Errorf("second run: did %q, %v, steps %v", did, err, steps.steps)
	}
}

// A blank file is fresh; one with a signature is not, and the reason
// names what is there; a cryptsetup volume is not fresh either.
func TestCheckFresh(t *testing.T) {
	dir := t.TempDir()
	img := dir + "/blank.img"
	luks2test.Sparse(t, img, 32<<20)
	if what, err := checkFresh(img); err != nil || what != "blank" {
		t.Fatalf("blank: %q, %v", what, err)
	}
	f, _ := os.OpenFile(img, os.O_WRONLY, 0)
	f.WriteAt([]byte{0x53, 0xef}, 1024+0x38) // ext2/3/4 magic
	f.Close()
	if _, err := checkFresh(img); err == nil {
		t.Fatal("a file with an ext4 magic is fresh")
	}
	small := dir + "/small.img"
	luks2test.Sparse(t, small, 16<<20)
	if _, err := checkFresh(small); err == nil {
		t.Fatal("16 MiB: no room for data after the LUKS2 metadata, yet fresh")
	}
	if _, err := checkFresh(luks2test.Format(t, []byte("k"))); err == nil {
		t.Fatal("a LUKS2 volume is fresh")
	}
	if !errors.Is(ErrNotNew, ErrNotNew) {
		t.Fatal()
	}
}
