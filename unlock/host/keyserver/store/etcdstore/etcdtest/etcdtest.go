// Package etcdtest runs a real etcd cluster (Debian's etcd-server, the
// `etcd` binary) on loopback ports for tests and the bench: each member a
// child process with its own temporary data folder, so a test can kill one
// the way a machine dies.
package etcdtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Binary is the etcd server program; install-deps.sh installs it
// (package etcd-server).
const Binary = "etcd"

// Member is one etcd process.
type Member struct {
	Name      string
	ClientURL string
	PeerURL   string
	DataDir   string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	log  bytes.Buffer
}

// Cluster is a running set of members.
type Cluster struct {
	Members []*Member
}

// Start runs an n-member cluster with data folders under dir and waits
// until every member answers /health (there is a leader).
func Start(ctx context.Context, dir string, n int) (*Cluster, error) {
	bin, err := exec.LookPath(Binary)
	if err != nil {
		return nil, fmt.Errorf("etcdtest: %w (install Debian's etcd-server: qemu-tests/setup/install-deps.sh)", err)
	}
	ports, err := freePorts(2 * n)
	if err != nil {
		return nil, err
	}
	var tok [8]byte
	rand.Read(tok[:])
	c := &Cluster{}
	var initial []string
	for i := range n {
		m := &Member{
			Name:      fmt.Sprintf("m%d", i),
			ClientURL: fmt.Sprintf("http://127.0.0.1:%d", ports[2*i]),
			PeerURL:   fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1]),
			DataDir:   filepath.Join(dir, fmt.Sprintf("m%d", i)),
		}
		c.Members = append(c.Members, m)
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	for _, m := range c.Members {
		m.cmd = exec.Command(bin,
			"--name", m.Name,
			"--data-dir", m.DataDir,
			"--listen-client-urls", m.ClientURL,
			"--advertise-client-urls", m.ClientURL,
			"--listen-peer-urls", m.PeerURL,
			"--initial-advertise-peer-urls", m.PeerURL,
			"--initial-cluster", strings.Join(initial, ","),
			"--initial-cluster-token", "unlockrd-test-"+hex.EncodeToString(tok[:]),
			"--initial-cluster-state", "new",
			"--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
		)
		m.cmd.Stdout = &lockedBuffer{m}
		m.cmd.Stderr = &lockedBuffer{m}
		// Its own process group: a test that dies leaves no etcd holding
		// the ports, and the Go test runner's signals don't reach it.
		m.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		m.done = make(chan struct{})
		if err := m.cmd.Start(); err != nil {
			c.Stop()
			return nil, fmt.Errorf("etcdtest: start %s: %w", m.Name, err)
		}
		go func() { m.cmd.Wait(); close(m.done) }()
	}
	deadline := time.Now().Add(2 * time.Minute)
	for _, m := range c.Members {
		for !m.healthy(ctx) {
			select {
			case <-m.done:
				c.Stop()
				return nil, fmt.Errorf("etcdtest: %s exited while starting:\n%s", m.Name, m.Log())
			case <-ctx.Done():
				c.Stop()
				return nil, ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				c.Stop()
				return nil, fmt.Errorf("etcdtest: %s not healthy after 2 minutes:\n%s", m.Name, m.Log())
			}
		}
	}
	return c, nil
}

// New starts an n-member cluster for a test, failing it (not skipping) if
// etcd is missing, and stops it when the test ends.
func New(t testing.TB, n int) *Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := Start(ctx, t.TempDir(), n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, m := range c.Members {
				t.Logf("etcd %s log:\n%s", m.Name, m.Log())
			}
		}
		c.Stop()
	})
	return c
}

func (m *Member) healthy(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, m.ClientURL+"/health", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var b [256]byte
	n, _ := resp.Body.Read(b[:])
	return resp.StatusCode == http.StatusOK && bytes.Contains(b[:n], []byte(`"true"`))
}

// Endpoints returns the client URLs of every member, dead or alive.
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, m := range c.Members {
		eps = append(eps, m.ClientURL)
	}
	return eps
}

// Kill ends member i with SIGKILL, as a crash would, and waits for it.
func (c *Cluster) Kill(i int) {
	m := c.Members[i]
	if m.cmd.Process != nil {
		m.cmd.Process.Kill()
	}
	<-m.done
}

// Leader returns the index of the member that currently leads.
func (c *Cluster) Leader(ctx context.Context) (int, error) {
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return -1, err
	}
	defer cli.Close()
	var errs []error
	for i, m := range c.Members {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		st, err := cli.Status(sctx, m.ClientURL)
		cancel()
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if st.Header.MemberId == st.Leader {
			return i, nil
		}
	}
	return -1, fmt.Errorf("etcdtest: no member says it leads: %w", errors.Join(errs...))
}

// Stop kills every member and removes the data folders.
func (c *Cluster) Stop() {
	for _, m := range c.Members {
		if m.cmd != nil && m.cmd.Process != nil {
			m.cmd.Process.Kill()
			<-m.done
		}
		os.RemoveAll(m.DataDir)
	}
}

// Log returns what member m printed (warnings and errors).
func (m *Member) Log() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.log.String()
}

type lockedBuffer struct{ m *Member }

func (w *lockedBuffer) Write(p []byte) (int, error) {
	w.m.mu.Lock()
	defer w.m.mu.Unlock()
	return w.m.log.Write(p)
}

// freePorts finds n distinct free loopback ports, holding each until all
// are found so none is handed out twice.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("etcdtest: free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
