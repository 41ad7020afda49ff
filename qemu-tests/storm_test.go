package qemutests

import (
	"context"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/storm"
)

// TestFleetStorm is the short form of the fleet storm (issue 12; the full
// form is `make bench`'s storm section): 4 VMs booting at once and 200
// synthetic hosts against 3 key server replicas on a 3-member etcd, with
// one replica and the etcd leader killed mid-storm while an
// unauthenticated client goes through the abuse suite's attacks. Every VM
// must boot with its data volume unlocked, every synthetic host get its
// key, and every host still be in the store with its key afterwards.
func TestFleetStorm(t *testing.T) {
	// 4 TCG guests on 2 shared cores: minutes, not seconds.
	ctx, cancel := context.WithTimeout(t.Context(), 25*time.Minute)
	defer cancel()
	res, err := storm.Run(ctx, storm.Config{
		Dir:        t.TempDir(),
		VMs:        4,
		Synthetic:  200,
		AttackEach: 3 * time.Second,
		Log:        testLog{t},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range res.Report() {
		t.Log(l)
	}
	for _, p := range res.Problems() {
		t.Error(p)
	}
}
