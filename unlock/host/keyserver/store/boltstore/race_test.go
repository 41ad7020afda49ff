//go:build race

package boltstore

// The race detector enables checkptr, which makes bbolt's reads of
// damaged pages fatal instead of panics.
const raceEnabled = true
