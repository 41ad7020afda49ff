// Command unlockrd-keyserver is the reference key service: see
// unlock/host/keyserver/cli for the commands and DESIGN §5/§7 for the
// contract. This file is wiring only.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	go func() {
		// After the first signal starts a graceful stop, a second one
		// kills the process as usual.
		<-ctx.Done()
		stop()
	}()
	code := cli.Main(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
