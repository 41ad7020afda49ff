// Package ulog is the one logger interface of unlockrd: every package that
// reports progress takes a Logger from its caller (the init's console, a
// tool's stderr, a test's t.Logf) and never picks an output itself.
package ulog

import "fmt"

// Logger receives status lines. Implementations add their own prefix and
// line ending.
type Logger interface {
	Printf(format string, v ...any)
}

// Null drops every line.
var Null Logger = null{}

type null struct{}

func (null) Printf(string, ...any) {}

// Prefixed prepends "prefix: " to each line of l.
func Prefixed(l Logger, prefix string) Logger {
	return prefixed{l, prefix}
}

type prefixed struct {
	l      Logger
	prefix string
}

func (p prefixed) Printf(format string, v ...any) {
	p.l.Printf("%s: %s", p.prefix, fmt.Sprintf(format, v...))
}
