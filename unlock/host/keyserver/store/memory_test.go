package store_test

import (
	"testing"

	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store"
	"github.com/unlockrd/unlockrd/unlock/host/keyserver/store/storetest"
)

func TestMemoryContract(t *testing.T) {
	storetest.Run(t, store.NewMemory())
}
