// Command mkunlockrd builds unlockrd initramfs images and checks LUKS2
// volumes as the boot will (DESIGN §7); see initramfs/host/mkcli for the
// commands. This file is wiring only.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/unlockrd/unlockrd/initramfs/host/mkcli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	go func() {
		// The first signal cancels the command (a build then leaves no
		// partial image); a second one kills the process as usual.
		<-ctx.Done()
		stop()
	}()
	code := mkcli.Main(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
