package cli_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/metrics/metricstest"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/etcdstore/etcdtest"
)

// TestMetricsCountRequests sends a known mix of key requests to the real
// binary and checks what /metrics says about them, and that the hosts'
// last-seen times reach the store without a write per request.
func TestMetricsCountRequests(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	tok1 := strings.TrimSpace(string(mustRun(t, nil, "host", "add", "--data", data, "db-1")))
	tok2 := strings.TrimSpace(string(mustRun(t, nil, "host", "add", "--data", data, "db-2")))
	mustRun(t, nil, "host", "revoke", "--data", data, "db-2")

	s := startServer(t, "--data", data, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
		"--host-rate", "0.001", "--host-burst", "3", "--last-seen-interval", "100ms")
	if s.metrics == "" {
		t.Fatal("serve printed no metrics: line")
	}
	want := map[int]int{}
	get := func(host, token string, status int) {
		t.Helper()
		if _, _, got := s.fetch(t, host, token); got != status {
			t.Fatalf("fetch %s: status %d, want %d", host, got, status)
		}
		want[status]++
	}
	for range 3 {
		get("db-1", tok1, 200)
	}
	get("db-1", tok1, 429) // over --host-burst
	get("db-1", tok2, 401)
	get("db-1", "not-the-token", 401)
	get("nobody", tok1, 404)
	get("db-2", tok2, 403)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f, err := metricstest.Scrape(ctx, "http://"+s.metrics+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"unlockrd_requests_total", []string{"outcome", "ok", "status", "200"}, 3},
		{"unlockrd_requests_total", []string{"outcome", "rate_limited", "status", "429"}, 1},
		{"unlockrd_requests_total", []string{"outcome", "bad_token", "status", "401"}, 2},
		{"unlockrd_requests_total", []string{"outcome", "unknown_host", "status", "404"}, 1},
		{"unlockrd_requests_total", []string{"outcome", "revoked", "status", "403"}, 1},
		{"unlockrd_requests_total", nil, 8},
		{"unlockrd_retry_after_total", []string{"status", "429"}, 1},
		{"unlockrd_retry_after_total", []string{"status", "503"}, 0},
		{"unlockrd_key_request_duration_seconds", nil, 8},
		{"unlockrd_key_request_duration_seconds", []string{"outcome", "ok"}, 3},
		// Every request passed the bearer check and read its record.
		{"unlockrd_store_operation_duration_seconds", []string{"op", "get", "result", "ok"}, 7},
		{"unlockrd_store_operation_duration_seconds", []string{"op", "get", "result", "not_found"}, 1},
		{"unlockrd_store_up", []string{"store", "bolt"}, 1},
		{"unlockrd_connections_total", nil, 8},
		{"unlockrd_tls_handshake_duration_seconds", nil, 8},
	} {
		if got := f.Sum(c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if got := f.Sum("unlockrd_connections_in_use"); got < 0 || got > 1 {
		t.Errorf("connections_in_use %v after every request finished", got)
	}
	if f.Sum("process_resident_memory_bytes") == 0 || f.Sum("go_goroutines") == 0 {
		t.Error("process and Go runtime collectors missing")
	}

	// Last-seen lands within a few flush intervals, for the host that
	// got its keys only.
	d, err := keyserver.OpenData(ctx, data, keyserver.DataOptions{LockTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for {
		h, err := d.Store.Get(ctx, "db-1")
		if err != nil {
			t.Fatal(err)
		}
		if !h.LastSeen.IsZero() {
			if h.LastSource != "127.0.0.1" || time.Since(h.LastSeen) > time.Minute {
				t.Fatalf("db-1 last seen %v from %q", h.LastSeen, h.LastSource)
			}
			break
		}
		if ctx.Err() != nil {
			t.Fatal("db-1's last-seen never reached the store")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if h, _ := d.Store.Get(ctx, "db-2"); !h.LastSeen.IsZero() || h.LastSource != "" {
		t.Fatalf("revoked db-2 marked seen: %v %q", h.LastSeen, h.LastSource)
	}
	// One flush wrote db-1 once for its three fetches.
	f, err = metricstest.Scrape(ctx, "http://"+s.metrics+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if got := f.Sum("unlockrd_store_operation_duration_seconds", "op", "update_each"); got != 1 {
		t.Errorf("%v batched store writes for 3 fetches of one host, want 1", got)
	}
}

// TestMetricsEtcdHealth: with --store etcd, /metrics shows the store and
// each etcd member up, and both down once the cluster is gone.
func TestMetricsEtcdHealth(t *testing.T) {
	c := etcdtest.New(t, 1)
	etcd := etcdArgs(c, "/health/")
	dir := t.TempDir()
	mustRun(t, nil, args([]string{"init", "--data", dir}, etcd)...)
	s := startServer(t, args([]string{"--data", dir, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"}, etcd)...)
	ep := c.Endpoints()[0]
	waitFor := func(up float64) {
		t.Helper()
		deadline := time.Now().Add(45 * time.Second)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			f, err := metricstest.Scrape(ctx, "http://"+s.metrics+"/metrics")
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			st, member := f.Sum("unlockrd_store_up", "store", "etcd"), f.Sum("unlockrd_etcd_endpoint_up", "endpoint", ep)
			if st == up && member == up {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("store_up %v, etcd_endpoint_up{%s} %v; want %v", st, ep, member, up)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	waitFor(1)
	c.Kill(0)
	waitFor(0)
}
