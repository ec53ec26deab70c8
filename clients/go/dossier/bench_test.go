package dossier_test

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"dossier.internal/go/dossier"
)

// The Go client's throughput on the deployed shape, 3 nodes and 8 shards of 3 replicas, with
// 64 concurrent callers on one client (`go test -run - -bench . -benchtime 8s`; the figures are
// in docs/benchmarks.md). Each reports ops/s and the p99 latency beside ns/op.
func BenchmarkPut64(b *testing.B) { benchmarkCluster(b, true) }
func BenchmarkGet64(b *testing.B) { benchmarkCluster(b, false) }

const benchCallers = 64

func benchmarkCluster(b *testing.B, writes bool) {
	cluster := startCluster(b, 3, 8)
	ctx := context.Background()
	client, err := dossier.Connect(ctx, dossier.DefaultConfig(cluster.seeds()...))
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	value := make([]byte, 256)
	// 1,024 patients over the 8 shards, each written once so that gets find a value.
	patients := make([]string, 1024)
	for i := range patients {
		patients[i] = fmt.Sprintf("bench-%d", i)
		if _, err := client.Put(ctx, patients[i], []byte("k"), value); err != nil {
			b.Fatal(err)
		}
	}
	var next int64
	latencies := make([][]time.Duration, benchCallers)
	var wg sync.WaitGroup
	b.ResetTimer()
	started := time.Now()
	for c := 0; c < benchCallers; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			for {
				i := atomic.AddInt64(&next, 1)
				if i > int64(b.N) {
					return
				}
				patient := patients[int(i)%len(patients)]
				t0 := time.Now()
				var err error
				if writes {
					_, err = client.Put(ctx, patient, []byte("k"), value)
				} else {
					_, _, err = client.Get(ctx, patient, []byte("k"))
				}
				if err != nil {
					b.Error(err)
					return
				}
				latencies[c] = append(latencies[c], time.Since(t0))
			}
		}(c)
	}
	wg.Wait()
	elapsed := time.Since(started)
	b.StopTimer()
	var all []time.Duration
	for _, l := range latencies {
		all = append(all, l...)
	}
	if len(all) == 0 {
		return
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	b.ReportMetric(float64(len(all))/elapsed.Seconds(), "ops/s")
	b.ReportMetric(float64(all[len(all)*99/100].Microseconds())/1000, "p99-ms")
}
