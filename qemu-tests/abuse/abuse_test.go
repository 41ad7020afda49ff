package abuse

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/unlockrd/unlockrd/initramfs/ulog/ulogtest"
	"github.com/unlockrd/unlockrd/qemu-tests/harness"
	"github.com/unlockrd/unlockrd/unlock/keys"
	"github.com/unlockrd/unlockrd/unlock/pin"
)

const (
	attackFor  = 5 * time.Second
	minSuccess = 0.90
	maxPeakRSS = 128 << 20
	hostID     = "db-1"
	tryEvery   = 400 * time.Millisecond // the host's pace: within its own bucket (1/s, burst 10)
	binEnv     = "UNLOCKRD_ABUSE_KEYSERVER"
)

// keyServerBin is the binary under attack, built in TestMain.
var keyServerBin string

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		fmt.Println("abuse: skipped in -short mode (runs the real key server under attack for about a minute)")
		os.Exit(0)
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if b := os.Getenv(binEnv); b != "" {
		keyServerBin = b
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "unlockrd-abuse-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	root, err := harness.ModuleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	keyServerBin = filepath.Join(dir, "unlockrd-keyserver")
	build := exec.Command("go", "build", "-trimpath", "-o", keyServerBin, "./cmd/unlockrd-keyserver")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build unlockrd-keyserver: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// target is a freshly started server with one enrolled host.
type target struct {
	ks    *harness.KeyServer
	pins  []pin.Pin
	token []byte
	key   []byte
}

func startTarget(t *testing.T, ctx context.Context) *target {
	t.Helper()
	data := filepath.Join(t.TempDir(), "keyserver")
	if _, err := harness.NewKeyServerData(ctx, keyServerBin, data); err != nil {
		t.Fatal(err)
	}
	tok, err := harness.AddHost(ctx, keyServerBin, data, hostID, nil)
	if err != nil {
		t.Fatal(err)
	}
	key, err := harness.HostKey(ctx, keyServerBin, data, hostID)
	if err != nil {
		t.Fatal(err)
	}
	// Started as the README says; no log writer: audit lines are kept by
	// the harness (KeyServer.Logs) only.
	ks, err := harness.StartKeyServer(ctx, keyServerBin, data, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ks.Stop)
	p, err := pin.Parse(ks.Pin)
	if err != nil {
		t.Fatal(err)
	}
	return &target{ks: ks, pins: []pin.Pin{p}, token: []byte(tok), key: key}
}

// fetchOnce is one try of the boot client: one attempt, no retry.
func (tg *target) fetchOnce(ctx context.Context) error {
	stop := fmt.Errorf("one try only")
	log := &ulogtest.Logger{}
	k, err := keys.Fetch(ctx, keys.Config{
		URLs:  []string{"https://" + tg.ks.Addr + "/v1/keys/{host}"},
		Pins:  tg.pins,
		Host:  hostID,
		Token: bytes.Clone(tg.token),
		Sleep: func(context.Context, time.Duration) error { return stop },
	}, log)
	if err != nil {
		// The client's own line says what went wrong.
		return fmt.Errorf("%w: %s", err, strings.TrimSpace(log.String()))
	}
	defer k.Wipe()
	if len(k.Keys) == 0 || !bytes.Equal(k.Keys[0].Bytes(), tg.key) {
		return fmt.Errorf("wrong key served")
	}
	return nil
}

func TestAbuse(t *testing.T) {
	for _, at := range Attacks() {
		t.Run(at.Name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			tg := startTarget(t, ctx)
			if err := tg.fetchOnce(ctx); err != nil {
				t.Fatalf("control fetch before the attack: %v", err)
			}
			actx, stop := context.WithTimeout(ctx, attackFor)
			defer stop()
			a := NewAttacker(actx, tg.ks.Addr, hostID)
			attackDone := make(chan struct{})
			go func() {
				defer close(attackDone)
				at.Run(a)
			}()
			time.Sleep(500 * time.Millisecond) // let the attack take hold first
			tries, ok := 0, 0
			var firstErr error
			for actx.Err() == nil {
				t0 := time.Now()
				tries++
				if err := tg.fetchOnce(ctx); err == nil {
					ok++
				} else if firstErr == nil {
					firstErr = err
				}
				if d := tryEvery - time.Since(t0); d > 0 {
					select {
					case <-time.After(d):
					case <-actx.Done():
					}
				}
			}
			<-attackDone
			_, peak, err := harness.ProcMemory(tg.ks.PID())
			a.CloseAll()
			if err != nil {
				t.Fatal(err)
			}
			rate := float64(ok) / float64(tries)
			line := fmt.Sprintf("abuse %-26s legitimate host: %3d/%-3d tries got the key (%5.1f %%), server peak RSS %5.1f MiB, %d attacker connections/requests",
				at.Name, ok, tries, 100*rate, float64(peak)/(1<<20), a.Attempts())
			fmt.Println(line)
			t.Log(line)
			if firstErr != nil {
				t.Logf("first failed try: %v", firstErr)
			}
			if rate < minSuccess {
				t.Errorf("legitimate host got its key on %.1f %% of tries, want ≥ %.0f %%", 100*rate, 100*minSuccess)
			}
			if peak > maxPeakRSS {
				t.Errorf("server peak RSS %.1f MiB, want ≤ %d MiB", float64(peak)/(1<<20), maxPeakRSS>>20)
			}
			if strings.Contains(tg.ks.Logs(), string(tg.token)) {
				t.Error("the server's output holds the host's token")
			}
		})
	}
}
