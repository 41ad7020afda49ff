package boot

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/unlockrd/unlockrd/unlock/blockdev"
	"github.com/unlockrd/unlockrd/unlock/secret"

	"github.com/unlockrd/unlockrd/initramfs/config"
	"github.com/unlockrd/unlockrd/initramfs/modload"
	"github.com/unlockrd/unlockrd/initramfs/retry"
	"github.com/unlockrd/unlockrd/initramfs/sysroot"
	"github.com/unlockrd/unlockrd/initramfs/ulog"
	"github.com/unlockrd/unlockrd/netboot/netup"
	"github.com/unlockrd/unlockrd/unlock/keyproto"
	"github.com/unlockrd/unlockrd/unlock/keys"
	"github.com/unlockrd/unlockrd/unlock/volumes"
)

// Stages are the entry points Run calls, one per stage. DefaultStages are
// the real packages; tests replace them to drive the pipeline's ordering
// and failure handling without a kernel.
type Stages struct {
	// Modules loads the image's kernel modules; it returns the stage line.
	Modules func(ctx context.Context, imageRoot string, con *Console) (string, error)
	// Devices waits for the root device and the volumes and validates
	// their headers. It needs no key.
	Devices func(ctx context.Context, cfg *config.Config, log ulog.Logger) (blockdev.BlockDev, []volumes.Prepared, error)
	// Network brings up the network.
	Network func(ctx context.Context, cfg netup.Config, log ulog.Logger) (Network, error)
	// Identity reads the host id and the token; Run fills in the
	// command-line values.
	Identity keys.Sources
	// Fetch fetches the keys (it retries until give_up_after itself).
	Fetch func(ctx context.Context, cfg keys.Config, log ulog.Logger) (*keys.Keys, error)
	// Unlock opens the prepared volumes in order with the first key that
	// fits; it returns those it opened before a failure.
	Unlock func(ctx context.Context, vols []volumes.Prepared, keys []*secret.Buf, lc volumes.Lifecycle, log ulog.Logger) ([]volumes.Opened, error)
	// Confirm tells the key server what the host did with its keys
	// (provisioned, rotated); nil skips it.
	Confirm func(ctx context.Context, cfg keys.Config, ks *keys.Keys, c keyproto.Confirmation) error
	// Swap makes a swap signature if missing and enables the swap.
	Swap func(path string, log ulog.Logger) error
	// Mount mounts root and the data volumes under newRoot.
	Mount func(ctx context.Context, newRoot string, root sysroot.Mount, data []sysroot.Mount) error
	// SwitchRoot execs the real init; it returns only on failure.
	SwitchRoot func(newRoot, init string, env []string) error

	// Refetch is the wait before fetching again when no key opened a
	// volume (the operator may be fixing the server): the project's one
	// backoff policy, slept through Sleep.
	Refetch retry.Backoff
	// Now and Sleep are the clock of the key stage.
	Now   func() time.Time
	Sleep func(ctx context.Context, d time.Duration) error
}

// Network is a configured network that stage 8 takes down.
type Network interface {
	String() string
	Teardown() error
}

// DefaultStages calls the real packages.
func DefaultStages() Stages {
	return Stages{
		Modules: loadModules,
		Devices: prepare,
		Network: func(ctx context.Context, cfg netup.Config, log ulog.Logger) (Network, error) {
			n, err := netup.Up(ctx, cfg, log)
			if err != nil {
				return nil, err
			}
			return n, nil
		},
		Fetch: keys.Fetch,
		Unlock: func(ctx context.Context, vols []volumes.Prepared, ks []*secret.Buf, lc volumes.Lifecycle, log ulog.Logger) ([]volumes.Opened, error) {
			return volumes.Unlock(ctx, vols, ks, lc, volumes.Options{}, log)
		},
		Confirm:    keys.Confirm,
		Swap:       volumes.EnsureSwap,
		Mount:      sysroot.MountAll,
		SwitchRoot: sysroot.SwitchRoot,
		// 30–60 s, as the refetch always waited: long enough not to
		// hammer a server the operator is fixing.
		Refetch: retry.Backoff{Base: time.Minute, Cap: time.Minute},
		Now:     time.Now,
		Sleep:   retry.Sleep,
	}
}

// loadModules is stage 3.
func loadModules(ctx context.Context, imageRoot string, con *Console) (string, error) {
	if err := modload.CheckRelease(imageRoot); err != nil {
		con.Printf("modules: %v", err)
	}
	mods, err := modload.ReadList(imageRoot)
	if err != nil {
		return "", err
	}
	res, err := modload.Load(ctx, imageRoot, mods, nil, ulog.Prefixed(con, "modules"))
	for _, t := range res.Times {
		con.Debugf("modules: %-22s %6.3fs .. %6.3fs", t.Name, t.Start.Seconds(), t.End.Seconds())
	}
	return res.String(), err
}

// prepare is the device half of stage 6: it finds the root device and the
// volumes and validates headers. An encrypted root becomes a volume named
// "root".
func prepare(ctx context.Context, cfg *config.Config, log ulog.Logger) (blockdev.BlockDev, []volumes.Prepared, error) {
	var sc blockdev.Scanner
	root, rootErr := sc.Wait(ctx, cfg.Root.Device)
	if rootErr != nil {
		rootErr = fmt.Errorf("root: %w", rootErr)
	}
	var specs []volumes.Spec
	// Either header copy: a root whose primary header is damaged opens
	// from its secondary.
	if root.Content.IsLUKS2() {
		specs = append(specs, volumes.Spec{Name: "root", Device: cfg.Root.Device, NoWorkqueue: true})
	}
	for _, v := range cfg.Volumes {
		specs = append(specs, volumes.Spec{Name: v.Name, Device: v.Device, Swap: v.Swap.On(),
			RandomSwap: v.Swap == config.SwapRandom, AllowDiscards: v.AllowDiscards, NoWorkqueue: v.WorkqueueBypass(),
			Provision: v.Provision})
	}
	// Volumes are checked even when root is missing: one boot reports
	// every problem.
	vols, err := volumes.Prepare(ctx, specs, volumes.Options{Scanner: sc}, log)
	return root, vols, errors.Join(rootErr, err)
}
