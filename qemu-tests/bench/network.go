package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/unlockrd/unlockrd/qemu-tests/harness"
)

// networkTarget bounds the network stage's own work in the default setup
// (DHCPv4 on QEMU's user network, TCG): from setting the link up to the
// link being configured.
const networkTarget = 500 * time.Millisecond

// benchNetwork measures the network stage from link up to configured:
//   - per method (DHCPv4, DHCPv4 race, static, DHCPv6, SLAAC) against a
//     real dnsmasq in network namespaces, by BenchmarkUp in the netup
//     package (`go test -bench`: the bench program links no boot code);
//   - inside QEMU (TCG), booting the walking-skeleton VM on user
//     networking, from the winning link's console line, next to the whole
//     network stage (which also waits for the driver to register the
//     link).
func benchNetwork(ctx context.Context, r *report) error {
	runs := r.runs(5, 2)
	root, err := harness.ModuleRoot()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "unlockrd-bench-network-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	testBin := filepath.Join(dir, "netup.test")
	build := exec.CommandContext(ctx, "go", "test", "-c", "-o", testBin, "./netboot/netup")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("go test -c ./netboot/netup: %w\n%s", err, out)
	}
	gb := exec.CommandContext(ctx, testBin, "-test.run", "^$", "-test.bench", "^BenchmarkUp$",
		"-test.benchtime", fmt.Sprintf("%dx", runs))
	out, err := gb.CombinedOutput()
	if err != nil {
		return fmt.Errorf("BenchmarkUp (needs root, dnsmasq): %w\n%s", err, out)
	}
	line := regexp.MustCompile(`(?m)^BenchmarkUp/(\S+?)(-\d+)?\s+\d+\s+([0-9.]+) ms-max\s+([0-9.]+) ms-median\s+([0-9.]+) ms-min`)
	ms := line.FindAllStringSubmatch(string(out), -1)
	if len(ms) == 0 {
		return fmt.Errorf("BenchmarkUp printed no results:\n%s", out)
	}
	r.printf("link up -> configured, network namespaces + dnsmasq, %d runs each (median, min, max):", runs)
	for _, m := range ms {
		r.printf("  %-30s %8s ms  (%s .. %s)", m[1], m[4], m[5], m[3])
	}

	// Inside QEMU: the default configuration (DHCP on every link).
	host := "bench-net-host"
	e, err := harness.Enroll(ctx, dir, host)
	if err != nil {
		return err
	}
	token := e.Token
	srv, err := e.Serve(ctx, nil)
	if err != nil {
		return err
	}
	defer srv.Stop()
	img, err := harness.BuildImage(ctx, e.Bins, harness.ImageConfig{
		URLs: []string{srv.GuestURL()}, Pins: []string{srv.Pin}, Host: "cmdline",
	}, dir)
	if err != nil {
		return err
	}
	// No ^: with "quiet", the first console line follows the firmware's
	// "Booting from ROM..." on the same line.
	linkRE := regexp.MustCompile(`unlockrd: network: eth0: dhcp .*\(link up to configured ([0-9.]+)s\)$`)
	stageRE := regexp.MustCompile(`unlockrd: network: eth0 \S+ via dhcp \(([0-9.]+)s\)$`)
	var linkUp, stage []time.Duration
	for i := 0; i < runs; i++ {
		// No disk: the VM is stopped once the network stage has
		// reported, long before it would need one.
		vm, err := harness.Start(ctx, harness.VMOptions{
			Name:      "bench-net",
			Initramfs: img,
			Append:    []string{"quiet", "rd.unlockrd.host=" + host},
			SMBIOS:    []string{harness.TokenCredential(token)},
		}, nil)
		if err != nil {
			return err
		}
		_, err = vm.ExpectLine(`unlockrd: network: eth0 \S+ via dhcp`, 8*time.Minute)
		lines := vm.Lines()
		vm.Kill()
		if err != nil {
			return fmt.Errorf("boot %d: %w", i+1, err)
		}
		var l, s time.Duration
		for _, ln := range lines {
			if m := linkRE.FindStringSubmatch(ln.Text); m != nil {
				l = secs(m[1])
			}
			if m := stageRE.FindStringSubmatch(ln.Text); m != nil {
				s = secs(m[1])
			}
		}
		if l == 0 || s == 0 {
			var got []string
			for _, ln := range lines {
				if strings.Contains(ln.Text, "network") {
					got = append(got, ln.Text)
				}
			}
			return fmt.Errorf("boot %d: no link or stage line with a duration:\n%s", i+1, strings.Join(got, "\n"))
		}
		linkUp, stage = append(linkUp, l), append(stage, s)
		r.printf("boot %d: link up -> configured %.2fs, network stage %.2fs", i+1, l.Seconds(), s.Seconds())
	}
	ls := summarize(linkUp)
	r.printf("QEMU (TCG, user networking, DHCPv4): link up -> configured %s", ls)
	r.printf("QEMU (TCG, user networking, DHCPv4): whole network stage (incl. waiting for the NIC driver) %s", summarize(stage))
	r.target("network: link up to configured ≤ 0.5 s (DHCPv4, QEMU user net, TCG)", ls.median <= networkTarget,
		fmt.Sprintf("median %.2fs over %d boots", ls.median.Seconds(), runs))
	return nil
}

func secs(s string) time.Duration {
	v, _ := strconv.ParseFloat(s, 64)
	return time.Duration(v * float64(time.Second))
}
