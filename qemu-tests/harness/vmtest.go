package harness

import (
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestVM is a VM tied to a test: failures are t.Fatal, console lines go
// to t.Log, and QEMU is killed when the test ends. The embedded VM's
// methods that return errors stay reachable as tv.VM.ExpectLine etc.
type TestVM struct {
	*VM
	t testing.TB
}

// StartVM boots a VM for a test. The console log is written to the test's
// artifact directory (kept with `go test -artifacts`) unless
// opts.SerialLog is set. A missing QEMU or kernel fails the test: a QEMU
// test that skips proves nothing. Unless opts.Concurrent is set, it first
// waits for any other harness VM on the machine to exit (see Start).
func StartVM(t testing.TB, opts VMOptions) *TestVM {
	t.Helper()
	if opts.SerialLog == "" {
		name := opts.Name
		if name == "" {
			name = "vm"
		}
		opts.SerialLog = filepath.Join(t.ArtifactDir(), name+"-serial.log")
	}
	lw := &testLogWriter{t: t}
	v, err := Start(t.Context(), opts, lw)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		_ = v.Kill()
		lw.stop()
		t.Logf("QEMU command line: %s", v.Cmdline())
		t.Logf("console log: %s", v.SerialLog())
	})
	return &TestVM{VM: v, t: t}
}

// ExpectLine waits for a line matching pattern (see VM.ExpectLine) and
// returns it; the test fails if none comes within timeout.
func (tv *TestVM) ExpectLine(pattern string, timeout time.Duration) string {
	tv.t.Helper()
	l, err := tv.VM.ExpectLine(pattern, timeout)
	if err != nil {
		tv.t.Fatalf("%v", err)
	}
	return l
}

// ExpectSubmatch waits for a line matching pattern and returns the
// pattern's submatches in it (index 0 is the whole match).
func (tv *TestVM) ExpectSubmatch(pattern string, timeout time.Duration) []string {
	tv.t.Helper()
	l := tv.ExpectLine(pattern, timeout)
	// ExpectLine has compiled the pattern successfully already.
	return regexp.MustCompile(pattern).FindStringSubmatch(l)
}

// ExpectNot waits for end and fails the test if any line up to it
// matched bad (see VM.ExpectNot).
func (tv *TestVM) ExpectNot(bad, end string, timeout time.Duration) string {
	tv.t.Helper()
	l, err := tv.VM.ExpectNot(bad, end, timeout)
	if err != nil {
		tv.t.Fatalf("%v", err)
	}
	return l
}

// Wait waits for QEMU to exit (see VM.Wait); the test fails on timeout,
// QEMU failure or kernel panic.
func (tv *TestVM) Wait(timeout time.Duration) {
	tv.t.Helper()
	if err := tv.VM.Wait(timeout); err != nil {
		tv.t.Fatalf("%v", err)
	}
}

// ExpectReport waits for the test init's "done" line and returns its
// parsed report.
func (tv *TestVM) ExpectReport(timeout time.Duration) *Report {
	tv.t.Helper()
	r, err := tv.VM.ExpectReport(timeout)
	if err != nil {
		tv.t.Fatalf("%v", err)
	}
	return r
}

// testLogWriter forwards log lines to t.Logf until the test's cleanup
// stops it: logging after a test finished panics.
type testLogWriter struct {
	t       testing.TB
	mu      sync.Mutex
	stopped bool
}

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.stopped {
		w.t.Log(strings.TrimSuffix(string(p), "\n"))
	}
	return len(p), nil
}

func (w *testLogWriter) stop() {
	w.mu.Lock()
	w.stopped = true
	w.mu.Unlock()
}
