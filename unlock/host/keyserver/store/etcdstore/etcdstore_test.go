package etcdstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/etcdstore"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/etcdstore/etcdtest"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/storetest"
)

var (
	sharedOnce sync.Once
	shared     *etcdtest.Cluster
	sharedDir  string
	sharedErr  error
)

// cluster is one three-member cluster for the tests that don't kill
// members; each test works under its own prefix.
func cluster(t *testing.T) *etcdtest.Cluster {
	t.Helper()
	sharedOnce.Do(func() {
		if sharedDir, sharedErr = os.MkdirTemp("", "etcdstore-test-"); sharedErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		shared, sharedErr = etcdtest.Start(ctx, sharedDir, 3)
	})
	if sharedErr != nil {
		t.Fatal(sharedErr)
	}
	return shared
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared != nil {
		shared.Stop()
	}
	if sharedDir != "" {
		os.RemoveAll(sharedDir)
	}
	os.Exit(code)
}

func open(t *testing.T, c *etcdtest.Cluster, prefix string, create bool) *etcdstore.Store {
	t.Helper()
	s, err := etcdstore.Open(context.Background(), etcdstore.Options{
		Endpoints: c.Endpoints(), Prefix: prefix, Create: create, Timeout: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestContract(t *testing.T) {
	storetest.Run(t, open(t, cluster(t), "/contract/", true))
}

// Two Stores on one prefix (two replicas) see each other's changes at once.
func TestSharedPrefix(t *testing.T) {
	c := cluster(t)
	a := open(t, c, "/shared/", true)
	b := open(t, c, "/shared", false) // the trailing slash is implied
	ctx := context.Background()
	if err := a.Create(ctx, store.Host{ID: "h1", State: store.Active}); err != nil {
		t.Fatal(err)
	}
	if h, err := b.Get(ctx, "h1"); err != nil || h.Version != 1 {
		t.Fatalf("other store: %+v, %v", h, err)
	}
	if _, err := b.Update(ctx, "h1", func(h *store.Host) error { h.State = store.Revoked; return nil }); err != nil {
		t.Fatal(err)
	}
	if h, err := a.Get(ctx, "h1"); err != nil || h.State != store.Revoked || h.Version != 2 {
		t.Fatalf("first store after update through the other: %+v, %v", h, err)
	}
}

func TestOpenChecksPrefix(t *testing.T) {
	c := cluster(t)
	ctx := context.Background()
	opts := func(prefix string, create bool) etcdstore.Options {
		return etcdstore.Options{Endpoints: c.Endpoints(), Prefix: prefix, Create: create, Timeout: 30 * time.Second}
	}
	// A prefix with nothing of ours is refused unless asked to create.
	if _, err := etcdstore.Open(ctx, opts("/typo/", false)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("open of an empty prefix without create: %v", err)
	}
	// Someone else's keys under the prefix: never adopted.
	raw := open(t, c, "/contract-raw/", true).Client()
	if _, err := raw.Put(ctx, "/foreign/config", "x"); err != nil {
		t.Fatal(err)
	}
	if _, err := etcdstore.Open(ctx, opts("/foreign/", true)); !errors.Is(err, store.ErrCorrupt) {
		t.Fatalf("open of a foreign prefix: %v", err)
	}
	// A schema marker from another version.
	if _, err := raw.Put(ctx, "/future/meta/schema", "unlockrd-hosts/9"); err != nil {
		t.Fatal(err)
	}
	_, err := etcdstore.Open(ctx, opts("/future/", true))
	if !errors.Is(err, store.ErrCorrupt) {
		t.Fatalf("open of another schema: %v", err)
	}
	t.Logf("refused: %v", err)
}

func TestCorruptRecords(t *testing.T) {
	c := cluster(t)
	s := open(t, c, "/corrupt/", true)
	ctx := context.Background()
	raw := s.Client()
	if _, err := raw.Put(ctx, "/corrupt/hosts/bad", "{"); err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Put(ctx, "/corrupt/hosts/moved", `{"id":"other","state":"active"}`); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"bad", "moved"} {
		if _, err := s.Get(ctx, id); !errors.Is(err, store.ErrCorrupt) {
			t.Errorf("Get(%s): %v, want ErrCorrupt", id, err)
		}
		if _, err := s.Update(ctx, id, func(*store.Host) error { return nil }); !errors.Is(err, store.ErrCorrupt) {
			t.Errorf("Update(%s): %v, want ErrCorrupt", id, err)
		}
	}
	_, err := s.List(ctx)
	if !errors.Is(err, store.ErrCorrupt) {
		t.Fatalf("List: %v, want ErrCorrupt", err)
	}
	t.Logf("List: %v", err)
}

// More records than one List page, in id order.
func TestListPages(t *testing.T) {
	s := open(t, cluster(t), "/pages/", true)
	ctx := context.Background()
	const n = 1234
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 32)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			errs <- s.Create(ctx, store.Host{ID: fmt.Sprintf("h%05d", i), State: store.Active})
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	hosts, err := s.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(hosts) != n {
		t.Fatalf("List returned %d hosts, want %d", len(hosts), n)
	}
	for i, h := range hosts {
		if want := fmt.Sprintf("h%05d", i); h.ID != want {
			t.Fatalf("hosts[%d] = %s, want %s", i, h.ID, want)
		}
	}
}

// No cluster at the endpoints: the store gives up after its timeout with
// ErrBusy (the server answers 503 + Retry-After), it does not hang.
func TestUnreachable(t *testing.T) {
	_, err := etcdstore.Open(context.Background(), etcdstore.Options{
		Endpoints: []string{"http://127.0.0.1:1"}, Create: true, Timeout: 500 * time.Millisecond,
	})
	if !errors.Is(err, store.ErrBusy) {
		t.Fatalf("open of an unreachable cluster: %v, want ErrBusy", err)
	}
	t.Logf("refused: %v", err)
}

// The leader is killed while records are read and changed: every
// operation still succeeds (the store retries against the members left),
// and no change is lost or applied twice, including writes whose answer
// was lost with the leader.
func TestLeaderKilledDuringWrites(t *testing.T) {
	c := etcdtest.New(t, 3)
	s := open(t, c, "/kill/", true)
	ctx := context.Background()
	const workers, perWorker = 6, 40
	if err := s.Create(ctx, store.Host{ID: "shared", State: store.Active}); err != nil {
		t.Fatal(err)
	}
	for w := range workers {
		if err := s.Create(ctx, store.Host{ID: fmt.Sprint("own-", w), State: store.Active}); err != nil {
			t.Fatal(err)
		}
	}
	var done atomic.Int64
	killed := make(chan int, 1)
	go func() {
		for done.Load() < workers*perWorker/3 {
			time.Sleep(5 * time.Millisecond)
		}
		leader, err := c.Leader(ctx)
		if err != nil {
			t.Error(err)
			leader = 0
		}
		c.Kill(leader)
		killed <- leader
	}()
	var wg sync.WaitGroup
	errs := make(chan error, workers*perWorker*3)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perWorker {
				tag := store.SealedKey{ID: fmt.Sprintf("%d.%d", w, i)}
				for _, id := range []string{"shared", fmt.Sprint("own-", w)} {
					if _, err := s.Update(ctx, id, func(h *store.Host) error {
						h.Keys = append(h.Keys, tag)
						return nil
					}); err != nil {
						errs <- fmt.Errorf("update %s with %s: %w", id, tag.ID, err)
					}
				}
				if _, err := s.Get(ctx, "shared"); err != nil {
					errs <- fmt.Errorf("get: %w", err)
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("killed member %d (the leader) during the writes", <-killed)

	check := func(id string, want int) {
		h, err := s.Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]int{}
		for _, k := range h.Keys {
			seen[k.ID]++
		}
		for tag, n := range seen {
			if n != 1 {
				t.Errorf("%s: change %s applied %d times", id, tag, n)
			}
		}
		if len(seen) != want || h.Version != uint64(1+want) {
			t.Errorf("%s: %d distinct changes, version %d; want %d, %d", id, len(seen), h.Version, want, 1+want)
		}
	}
	check("shared", workers*perWorker)
	for w := range workers {
		check(fmt.Sprint("own-", w), perWorker)
	}
}
