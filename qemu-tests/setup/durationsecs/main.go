// Command durationsecs prints a Go duration (as -fuzztime takes it) in
// whole seconds, for qemu-tests/setup/fuzz.sh's executions-per-second.
package main

import (
	"fmt"
	"os"
	"time"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: durationsecs DURATION")
		os.Exit(2)
	}
	d, err := time.ParseDuration(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Println(int64(d.Seconds()))
}
