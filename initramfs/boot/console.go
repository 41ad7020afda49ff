package boot

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Console writes unlockrd's lines to the console, and a copy to the kernel
// log at debug level: kept in dmesg for the booted system, but not echoed
// to the console a second time at the default console log level.
type Console struct {
	mu    sync.Mutex
	out   io.Writer
	kmsg  io.Writer
	debug bool
}

// NewConsole logs to out (and kmsg when non-nil).
func NewConsole(out, kmsg io.Writer) *Console {
	return &Console{out: out, kmsg: kmsg}
}

// OpenConsole opens /dev/console and /dev/kmsg, falling back to stderr.
func OpenConsole() *Console {
	var out io.Writer = os.Stderr
	if f, err := os.OpenFile("/dev/console", os.O_WRONLY|unix.O_NOCTTY, 0); err == nil {
		out = f
	}
	var kmsg io.Writer
	if f, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0); err == nil {
		kmsg = f
	}
	return NewConsole(out, kmsg)
}

// SetDebug turns Debugf output on.
func (c *Console) SetDebug(on bool) {
	c.mu.Lock()
	c.debug = on
	c.mu.Unlock()
}

// Printf writes one "unlockrd: ..." line.
func (c *Console) Printf(format string, v ...any) {
	msg := strings.TrimRight(fmt.Sprintf(format, v...), "\n")
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, line := range strings.Split(msg, "\n") {
		fmt.Fprintf(c.out, "unlockrd: %s\n", line)
		if c.kmsg != nil {
			fmt.Fprintf(c.kmsg, "<7>unlockrd: %s\n", line)
		}
	}
}

// Debugf writes only with rd.unlockrd.debug.
func (c *Console) Debugf(format string, v ...any) {
	c.mu.Lock()
	on := c.debug
	c.mu.Unlock()
	if on {
		c.Printf("debug: "+format, v...)
	}
}
