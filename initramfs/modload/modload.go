// Package modload is boot stage 3: it loads the kernel modules the image
// carries, in the dependency order the builder computed and wrote to the
// load list (layout.ModulesPath, /etc/unlockrd/modules.json).
//
// Modules whose dependencies are all loaded are loaded concurrently: module
// init functions probe hardware and can sleep, and under emulation the
// difference between a serial and a parallel load is over a second.
package modload

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/layout"
	"github.com/unlockrd/unlockrd/initramfs/ulog"

	"golang.org/x/sys/unix"
)

// Result summarises a load.
type Result struct {
	Loaded   int // newly loaded
	Present  int // already loaded or built in
	Failed   []string
	Duration time.Duration
	// Times is how long each module's load took, in completion order;
	// printed with rd.unlockrd.debug to find what holds a boot up.
	Times []Timing
}

// Timing is one module's load.
type Timing struct {
	Name       string
	Start, End time.Duration // since Load began
}

func (r Result) String() string {
	s := fmt.Sprintf("%d loaded", r.Loaded)
	if r.Present > 0 {
		s += fmt.Sprintf(", %d already present", r.Present)
	}
	if len(r.Failed) > 0 {
		s += fmt.Sprintf(", optional failed: %s", strings.Join(r.Failed, " "))
	}
	return s
}

// ReadList reads the load list from root (the image root, "/" at boot).
func ReadList(root string) ([]layout.Module, error) {
	b, err := os.ReadFile(filepath.Join(root, layout.ModulesPath))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("module list: %w", err)
	}
	mods, err := layout.DecodeModules(b)
	if err != nil {
		return nil, fmt.Errorf("module list %w", err)
	}
	return mods, nil
}

// Loader loads one module file; tests replace it.
type Loader func(path string) error

// FileLoader loads with finit_module(2). Compressed modules are handed to
// the kernel as they are (MODULE_INIT_COMPRESSED_FILE): the builder keeps
// them compressed only for kernels that decompress modules themselves.
// Decompressing here instead would link three decompressors into PID 1.
func FileLoader(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	flags := 0
	switch filepath.Ext(path) {
	case ".xz", ".zst", ".gz":
		flags = moduleInitCompressedFile
	}
	return unix.FinitModule(int(f.Fd()), "", flags)
}

// moduleInitCompressedFile is MODULE_INIT_COMPRESSED_FILE (Linux 6.x).
const moduleInitCompressedFile = 4

// Load loads mods under root. Every module waits only for its own
// dependencies. A required module that fails fails the stage, naming it;
// modules that depend on a failed one are not attempted.
func Load(ctx context.Context, root string, mods []layout.Module, load Loader, log ulog.Logger) (Result, error) {
	start := time.Now()
	if load == nil {
		load = FileLoader
	}
	type state struct {
		done chan struct{}
		err  error
	}
	st := make(map[string]*state, len(mods))
	for _, m := range mods {
		st[m.Name] = &state{done: make(chan struct{})}
	}
	var (
		mu  sync.Mutex
		res Result
		wg  sync.WaitGroup
	)
	for _, m := range mods {
		m := m
		s := st[m.Name]
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(s.done)
			for _, d := range m.Deps {
				ds, ok := st[d]
				if !ok {
					continue // built in, or resolved at build time
				}
				select {
				case <-ds.done:
				case <-ctx.Done():
					s.err = ctx.Err()
					return
				}
				if ds.err != nil && !isOptionalErr(ds.err) {
					s.err = fmt.Errorf("module %s: dependency %s failed", m.Name, d)
					return
				}
			}
			t0 := time.Since(start)
			err := load(filepath.Join(root, m.Path))
			t1 := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			res.Times = append(res.Times, Timing{Name: m.Name, Start: t0, End: t1})
			switch {
			case err == nil:
				res.Loaded++
			case errors.Is(err, unix.EEXIST):
				res.Present++
			case m.Optional:
				res.Failed = append(res.Failed, m.Name)
				s.err = optionalErr{fmt.Errorf("module %s: %w", m.Name, err)}
				log.Printf("module %s (optional) not loaded: %v", m.Name, err)
			default:
				s.err = fmt.Errorf("module %s (%s): %w", m.Name, m.Path, err)
			}
		}()
	}
	wg.Wait()
	res.Duration = time.Since(start)
	var errs []error
	for _, m := range mods {
		if e := st[m.Name].err; e != nil && !isOptionalErr(e) {
			errs = append(errs, e)
		}
	}
	return res, errors.Join(errs...)
}

type optionalErr struct{ error }

func (o optionalErr) Unwrap() error { return o.error }

func isOptionalErr(err error) bool {
	var o optionalErr
	return errors.As(err, &o)
}

// CheckRelease compares the kernel release the image was built for with
// the running kernel. A mismatch means no module will load.
func CheckRelease(root string) error {
	want, err := os.ReadFile(filepath.Join(root, layout.ReleasePath))
	if err != nil {
		return nil // image without modules
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return fmt.Errorf("uname: %w", err)
	}
	have := unix.ByteSliceToString(u.Release[:])
	if w := layout.DecodeRelease(want); w != have {
		return fmt.Errorf("image was built for kernel %s but the running kernel is %s: its modules cannot load", w, have)
	}
	return nil
}
