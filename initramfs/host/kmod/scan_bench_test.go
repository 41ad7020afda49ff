package kmod

import (
	"testing"

	"github.com/unlockrd/unlockrd/qemu-tests/kernelcache"
)

// BenchmarkAliasScan is the cold alias scan of Debian 13's tree (no
// modules.dep, .ko.xz): what a first build for that tree pays.
func BenchmarkAliasScan(b *testing.B) {
	k := kernelcache.ForTestNamed(b, kernelcache.Debian13)
	for b.Loop() {
		b.Setenv("XDG_CACHE_HOME", b.TempDir())
		tree, err := Open(k.Modules)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := tree.buildAliasIndex(); err != nil {
			b.Fatal(err)
		}
	}
}
