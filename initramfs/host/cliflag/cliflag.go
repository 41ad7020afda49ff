// Package cliflag is the one command-line convention of the unlockrd tools
// (mkunlockrd, unlockrd-keyserver): cmd/*/main.go wires a signal context to
// a Main(ctx, args, stdin, stdout, stderr) int of a host package, whose
// commands parse their flags with Parse and return an error that Status
// turns into the exit status: 0 done (or help asked for), 1 failed, 2 bad
// usage.
//
// It is host-side code: the init has no command line of this kind.
package cliflag

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
)

// ErrUsage is wrapped by every usage error: the command line is wrong, not
// the world. Status maps it to exit status 2.
var ErrUsage = errors.New("usage")

// Usagef returns a usage error with a message.
func Usagef(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrUsage, fmt.Sprintf(format, a...))
}

// Status is the exit status for the error a command returned.
func Status(err error) int {
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, ErrUsage):
		return 2
	}
	return 1
}

// NewFlagSet returns a flag set that returns its errors (never exits) and
// prints its messages and usage to out (io.Discard to leave the printing
// to the caller, which then finds the message in the error).
func NewFlagSet(name string, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(out)
	return fs
}

// Parse parses args with fs and returns the positional arguments. Flags
// may come before and after them ("host add NAME --data DIR" as well as
// "host add --data DIR NAME"). A bad flag is a usage
// error naming the flag set; -h and -help return flag.ErrHelp.
func Parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, Usagef("%s: %v", fs.Name(), err)
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// Multi is a repeatable string flag: each use appends one value.
type Multi []string

func (m *Multi) String() string { return strings.Join(*m, ",") }

// Set appends s.
func (m *Multi) Set(s string) error { *m = append(*m, s); return nil }
