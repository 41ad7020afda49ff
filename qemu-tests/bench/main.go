// Command bench measures unlockrd against its targets and prints a report
// (`make bench`). Targets are checked here, never by timed assertions in
// tests: a shared, noisy machine makes single timings unreliable, so each
// figure is a median over several runs, with the spread shown.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
)

// section is one part of the report.
type section struct {
	name string
	run  func(ctx context.Context, r *report) error
}

// report collects result lines and the target verdicts.
type report struct {
	lines   []string
	verdict []string
	quick   bool
	kernels []string // cache names (kernelcache.Names)
	nolock  bool     // VMs skip the machine-wide lock
}

func (r *report) printf(format string, a ...any) {
	l := fmt.Sprintf(format, a...)
	fmt.Println(l)
	r.lines = append(r.lines, l)
}

// runs is how many times a section repeats its measurement: full, or
// quick with -quick.
func (r *report) runs(full, quick int) int {
	if r.quick {
		return quick
	}
	return full
}

// target records a target's verdict.
func (r *report) target(name string, ok bool, detail string) {
	mark := "MET"
	if !ok {
		mark = "MISSED"
	}
	r.verdict = append(r.verdict, fmt.Sprintf("%-7s %s: %s", mark, name, detail))
}

func main() {
	only := flag.String("only", "", "comma-separated sections to run (default all)")
	quick := flag.Bool("quick", false, "fewer repetitions (for a smoke run)")
	nolock := flag.Bool("nolock", false, "boot VMs without waiting for the machine-wide VM lock (sooner on a busy machine, noisier)")
	kernels := flag.String("kernels", strings.Join(kernelcache.Names(), ","), "comma-separated kernels the boot, size and race sections use")
	flag.Parse()
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()

	sections := []section{
		{"boot", benchBoot},
		{"size", benchSize},
		{"build", benchBuild},
		{"race", benchRace},
		{"unlock", benchUnlock},
		{"keyserver", benchKeyServer},
		{"network", benchNetwork},
		{"storm", benchStorm},
	}
	r := &report{quick: *quick, nolock: *nolock, kernels: strings.Split(*kernels, ",")}
	failed := false
	for _, s := range sections {
		if *only != "" && !slices.Contains(strings.Split(*only, ","), s.name) {
			continue
		}
		r.printf("\n## %s", s.name)
		start := time.Now()
		if err := s.run(ctx, r); err != nil {
			r.printf("ERROR: %v", err)
			failed = true
		}
		r.printf("(%s took %s)", s.name, time.Since(start).Round(time.Second))
	}
	fmt.Println("\n## targets")
	for _, v := range r.verdict {
		fmt.Println(v)
	}
	if failed {
		os.Exit(1)
	}
}

// stats summarises repeated measurements.
type stats struct{ min, median, max time.Duration }

func summarize(ds []time.Duration) stats {
	s := slices.Clone(ds)
	slices.Sort(s)
	return stats{min: s[0], median: s[len(s)/2], max: s[len(s)-1]}
}

func (s stats) String() string {
	return fmt.Sprintf("median %.2fs (min %.2fs, max %.2fs)", s.median.Seconds(), s.min.Seconds(), s.max.Seconds())
}
