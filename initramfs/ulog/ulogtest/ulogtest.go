// Package ulogtest is the test logger: lines go to t.Logf and are kept, so
// a test can assert what a stage printed.
package ulogtest

import (
	"fmt"
	"strings"
	"sync"
	"testing"
)

// Logger logs to a test and records every line. Its zero value records
// without logging. It is safe for concurrent use.
type Logger struct {
	T     testing.TB
	mu    sync.Mutex
	lines []string
}

// New returns a Logger for t.
func New(t testing.TB) *Logger { return &Logger{T: t} }

// Printf records a line and logs it to the test.
func (l *Logger) Printf(format string, v ...any) {
	s := strings.TrimRight(fmt.Sprintf(format, v...), "\n")
	l.mu.Lock()
	l.lines = append(l.lines, s)
	l.mu.Unlock()
	if l.T != nil {
		l.T.Helper()
		l.T.Log(s)
	}
}

// Lines returns a copy of the lines so far.
func (l *Logger) Lines() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.lines...)
}

// String is every line so far, joined by newlines.
func (l *Logger) String() string {
	return strings.Join(l.Lines(), "\n")
}

// Contains reports whether some line contains sub.
func (l *Logger) Contains(sub string) bool {
	for _, s := range l.Lines() {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}
