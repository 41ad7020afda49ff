package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/etcdstore/etcdtest"
)

// These tests run the real program against a real three-member etcd
// cluster (Debian's etcd-server, started by etcdtest on loopback ports).
// Without etcd installed they fail: install-deps.sh installs it.

// etcdArgs selects the cluster c under prefix for a command.
func etcdArgs(c *etcdtest.Cluster, prefix string) []string {
	return []string{"--store", "etcd", "--etcd-endpoints", strings.Join(c.Endpoints(), ","), "--etcd-prefix", prefix}
}

func args(a ...[]string) []string {
	var out []string
	for _, x := range a {
		out = append(out, x...)
	}
	return out
}

// replica makes the data folder of a second replica: the master key and
// TLS key copied from the first, as the README tells operators to.
func replica(t *testing.T, from string) string {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{keyserver.MasterKeyFile, keyserver.TLSKeyFile} {
		b, err := os.ReadFile(filepath.Join(from, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestEtcdReplicas: two servers on one etcd cluster serve the same hosts,
// and whatever an admin command changes through one replica's settings
// is served by the other at its next request.
func TestEtcdReplicas(t *testing.T) {
	c := etcdtest.New(t, 3)
	etcd := etcdArgs(c, "/fleet/")
	dirA := t.TempDir()
	// The first replica creates the master key and TLS key.
	pinA := strings.TrimSpace(string(mustRun(t, nil, args([]string{"init", "--data", dirA}, etcd)...)))
	tok1 := strings.TrimSpace(string(mustRun(t, nil, args([]string{"host", "add", "--data", dirA}, etcd, []string{"db-1"})...)))
	if _, err := os.Stat(filepath.Join(dirA, keyserver.DBFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("--store etcd made a %s: %v", keyserver.DBFile, err)
	}

	// A second replica without the master key refuses to start, saying
	// which key it needs, and does not make one of its own.
	bare := t.TempDir()
	_, errs, code := run(t, nil, args([]string{"serve", "--data", bare, "--listen", "127.0.0.1:0"}, etcd)...)
	if code != 1 || !strings.Contains(errs, "refusing to start") || !strings.Contains(errs, "copy master.key") {
		t.Fatalf("replica without master key: exit %d: %s", code, errs)
	}
	if _, err := os.Stat(filepath.Join(bare, keyserver.MasterKeyFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a replica made its own master key for sealed hosts")
	}

	dirB := replica(t, dirA)
	noLimits := []string{"--listen", "127.0.0.1:0", "--rate", "0", "--host-rate", "0"}
	a := startServer(t, args([]string{"--data", dirA}, noLimits, etcd)...)
	b := startServer(t, args([]string{"--data", dirB}, noLimits, etcd)...)
	if a.pin.String() != pinA || b.pin.String() != pinA {
		t.Fatalf("pins: init %s, replica A %s, replica B %s (same TLS key, same pin)", pinA, a.pin, b.pin)
	}
	if !strings.Contains(a.Stderr(), "etcd "+c.Endpoints()[0]) {
		t.Fatalf("serve does not say it serves from etcd: %s", a.Stderr())
	}

	idsA, keysA, stA := a.fetch(t, "db-1", tok1)
	idsB, keysB, stB := b.fetch(t, "db-1", tok1)
	if stA != 200 || stB != 200 || idsA[0] != idsB[0] || !bytes.Equal(keysA[0], keysB[0]) {
		t.Fatalf("replicas disagree: %d %v, %d %v", stA, idsA, stB, idsB)
	}

	// Added through B's folder, served by A at once.
	tok2 := strings.TrimSpace(string(mustRun(t, nil, args([]string{"host", "add", "--data", dirB}, etcd, []string{"db-2"})...)))
	_, keys2, st := a.fetch(t, "db-2", tok2)
	if st != 200 {
		t.Fatalf("host added through B, fetched from A: %d", st)
	}
	if raw := mustRun(t, nil, args([]string{"host", "key", "--data", dirA}, etcd, []string{"db-2"})...); !bytes.Equal(raw, keys2[0]) {
		t.Fatal("host key through A differs from what A serves")
	}

	// Rotation through A, seen by B; revocation through B, seen by A.
	newID := strings.TrimSpace(string(mustRun(t, nil, args([]string{"host", "rotate", "--data", dirA}, etcd, []string{"db-1"})...)))
	if ids, keys, _ := b.fetch(t, "db-1", tok1); len(ids) != 2 || ids[0] != newID || !bytes.Equal(keys[1], keysA[0]) {
		t.Fatalf("B during rotation: %v", ids)
	}
	mustRun(t, nil, args([]string{"host", "rotate", "--finish", "--data", dirA}, etcd, []string{"db-1"})...)
	if ids, _, _ := b.fetch(t, "db-1", tok1); len(ids) != 1 || ids[0] != newID {
		t.Fatalf("B after --finish: %v", ids)
	}
	mustRun(t, nil, args([]string{"host", "revoke", "--data", dirB}, etcd, []string{"db-2"})...)
	if _, _, st := a.fetch(t, "db-2", tok2); st != 403 {
		t.Fatalf("A after revoke through B: %d", st)
	}

	var list []struct{ Host, State string }
	if err := json.Unmarshal(mustRun(t, nil, args([]string{"host", "list", "--json", "--data", dirB}, etcd)...), &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].Host != "db-1" || list[0].State != "active" || list[1].State != "revoked" {
		t.Fatalf("list: %+v", list)
	}
	// Health reflects the shared store.
	for _, s := range []*server{a, b} {
		resp, err := keyserver.PinnedClient(s.pin).Get("https://" + s.addr + keyserver.HealthPath)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("health: %v %v", resp, err)
		}
		resp.Body.Close()
	}
}

// TestEtcdServeRefuses: a wrong master key, a corrupt record, someone
// else's data under the prefix, or a typo'd prefix: the server refuses to
// start and says which.
func TestEtcdServeRefuses(t *testing.T) {
	c := etcdtest.New(t, 3)
	etcd := etcdArgs(c, "/refuse/")
	dir := t.TempDir()
	mustRun(t, nil, args([]string{"host", "add", "--data", dir}, etcd, []string{"db-1"})...)

	other := filepath.Join(t.TempDir(), "other.key")
	if _, err := keyserver.CreateMasterKey(other); err != nil {
		t.Fatal(err)
	}
	serve := []string{"serve", "--data", dir, "--listen", "127.0.0.1:0"}
	_, errs, code := run(t, nil, args(serve, etcd, []string{"--master-key", other})...)
	if code != 1 || !strings.Contains(errs, "wrong master key") || !strings.Contains(errs, other) || !strings.Contains(errs, "prefix /refuse/") {
		t.Fatalf("wrong master key: exit %d: %s", code, errs)
	}

	_, errs, code = run(t, nil, args([]string{"host", "list", "--data", dir}, etcdArgs(c, "/typo/"))...)
	if code != 1 || !strings.Contains(errs, "holds no unlockrd host data") {
		t.Fatalf("typo'd prefix: exit %d: %s", code, errs)
	}

	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := cli.Put(ctx, "/other-app/config", "x"); err != nil {
		t.Fatal(err)
	}
	_, errs, code = run(t, nil, args(serve, etcdArgs(c, "/other-app/"))...)
	if code != 1 || !strings.Contains(errs, "not our data") {
		t.Fatalf("foreign prefix: exit %d: %s", code, errs)
	}

	if _, err := cli.Put(ctx, "/refuse/hosts/db-9", "{not json"); err != nil {
		t.Fatal(err)
	}
	_, errs, code = run(t, nil, args(serve, etcd)...)
	if code != 1 || !strings.Contains(errs, "refusing to start") || !strings.Contains(errs, "corrupt") || !strings.Contains(errs, "/refuse/hosts/db-9") {
		t.Fatalf("corrupt record: exit %d: %s", code, errs)
	}

	_, errs, code = run(t, nil, args(serve, []string{"--store", "etcd", "--etcd-endpoints", "http://127.0.0.1:1", "--lock-timeout", "1s"})...)
	if code != 1 || !strings.Contains(errs, "store busy") || !strings.Contains(errs, "127.0.0.1:1") {
		t.Fatalf("unreachable etcd: exit %d: %s", code, errs)
	}
	if _, _, code := run(t, nil, "host", "list", "--data", dir, "--store", "etcd"); code != 2 {
		t.Fatalf("--store etcd without endpoints: exit %d", code)
	}
}

// fetchRetrying fetches until a 200, as a booting host does: transport
// errors, 429 and 503 are retried with backoff (the key service may be
// briefly unable to answer); any other status is a failure.
func fetchRetrying(ctx context.Context, c *http.Client, url, token string) ([][]byte, int, error) {
	retries := 0
	backoff := 50 * time.Millisecond
	for {
		_, keys, st, err := keyserver.Fetch(ctx, c, url, token)
		if err == nil && st == 200 {
			return keys, retries, nil
		}
		if err == nil && st != http.StatusTooManyRequests && st != http.StatusServiceUnavailable {
			return nil, retries, fmt.Errorf("%s: status %d", url, st)
		}
		retries++
		select {
		case <-ctx.Done():
			return nil, retries, fmt.Errorf("%s: gave up after %d retries (last: %d %v)", url, retries, st, err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// TestEtcdMemberKilledUnderLoad: clients fetch keys from two replicas
// while an admin adds hosts, and the etcd leader is killed (SIGKILL)
// part-way. Every fetch succeeds, with the right key, after retries;
// every host whose `host add` succeeded is there afterwards and served by
// both replicas: nothing acknowledged is lost.
func TestEtcdMemberKilledUnderLoad(t *testing.T) {
	c := etcdtest.New(t, 3)
	etcd := etcdArgs(c, "/load/")
	dirA := t.TempDir()
	mustRun(t, nil, args([]string{"init", "--data", dirA}, etcd)...)
	const hosts = 16
	tokens := make([]string, hosts)
	keys := make([][]byte, hosts)
	for i := range hosts {
		name := fmt.Sprint("h", i)
		tokens[i] = strings.TrimSpace(string(mustRun(t, nil, args([]string{"host", "add", "--data", dirA}, etcd, []string{name})...)))
		keys[i] = mustRun(t, nil, args([]string{"host", "key", "--data", dirA}, etcd, []string{name})...)
	}
	dirB := replica(t, dirA)
	noLimits := []string{"--listen", "127.0.0.1:0", "--rate", "0", "--host-rate", "0"}
	reps := []*server{
		startServer(t, args([]string{"--data", dirA}, noLimits, etcd)...),
		startServer(t, args([]string{"--data", dirB}, noLimits, etcd)...),
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const workers, perWorker = 8, 100
	var done, retries atomic.Int64
	killed := make(chan int, 1)
	go func() {
		for done.Load() < workers*perWorker/3 && ctx.Err() == nil {
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

	// The admin adds hosts meanwhile, through replica B's settings.
	type added struct {
		name, token string
	}
	var adds []added
	var addErrs []string
	addsDone := make(chan struct{})
	go func() {
		defer close(addsDone)
		for i := 0; done.Load() < workers*perWorker && i < 40; i++ {
			name := fmt.Sprint("new-", i)
			out, errs, code := run(t, nil, args([]string{"host", "add", "--lock-timeout", "60s", "--data", dirB}, etcd, []string{name})...)
			if code != 0 {
				addErrs = append(addErrs, fmt.Sprintf("%s: exit %d: %s", name, code, errs))
				continue
			}
			adds = append(adds, added{name, strings.TrimSpace(string(out))})
		}
	}()

	var wg sync.WaitGroup
	errc := make(chan error, workers*perWorker)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			clients := []*http.Client{keyserver.PinnedClient(reps[0].pin), keyserver.PinnedClient(reps[1].pin)}
			for i := range perWorker {
				r := (w + i) % 2
				h := (w*perWorker + i) % hosts
				url := "https://" + reps[r].addr + keyserver.KeysPath + fmt.Sprint("h", h)
				got, n, err := fetchRetrying(ctx, clients[r], url, tokens[h])
				retries.Add(int64(n))
				if err != nil {
					errc <- err
				} else if len(got) != 1 || !bytes.Equal(got[0], keys[h]) {
					errc <- fmt.Errorf("%s: wrong key", url)
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	<-addsDone
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	for _, e := range addErrs {
		t.Errorf("host add failed: %s", e)
	}
	leader := <-killed
	t.Logf("%d fetches from 2 replicas, leader (member %d) killed after %d; %d retries; %d hosts added meanwhile",
		workers*perWorker, leader, workers*perWorker/3, retries.Load(), len(adds))
	if len(adds) == 0 {
		t.Fatal("no host was added during the load")
	}

	// Nothing acknowledged is lost: every added host is served by both
	// replicas with the key the admin command reads back.
	for _, ad := range adds {
		want := mustRun(t, nil, args([]string{"host", "key", "--data", dirA}, etcd, []string{ad.name})...)
		for _, s := range reps {
			got, _, err := fetchRetrying(ctx, keyserver.PinnedClient(s.pin), "https://"+s.addr+keyserver.KeysPath+ad.name, ad.token)
			if err != nil || len(got) != 1 || !bytes.Equal(got[0], want) {
				t.Fatalf("%s from %s after the kill: %v", ad.name, s.addr, err)
			}
		}
	}
	var list []struct{ Host string }
	if err := json.Unmarshal(mustRun(t, nil, args([]string{"host", "list", "--json", "--data", dirA}, etcd)...), &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != hosts+len(adds) {
		t.Fatalf("list has %d hosts, want %d", len(list), hosts+len(adds))
	}
	for _, s := range reps {
		select {
		case err := <-s.done:
			t.Fatalf("a replica exited: %v: %s", err, s.Stderr())
		default:
		}
	}
}
