package dossier

import (
	"encoding/json"
	"os"
	"strconv"
	"testing"
)

// patientHashVectors mirrors clients/testdata/patient-hash-vectors.json.
// Seeds and hashes are decimal strings because they exceed 2^53.
type patientHashVectors struct {
	Seed    string `json:"seed"`
	Vectors []struct {
		Input string `json:"input"`
		Hash  string `json:"hash"`
	} `json:"vectors"`
}

func TestPatientHashVectors(t *testing.T) {
	raw, err := os.ReadFile("../../testdata/patient-hash-vectors.json")
	if err != nil {
		t.Fatalf("reading test vectors: %v", err)
	}
	var file patientHashVectors
	if err := json.Unmarshal(raw, &file); err != nil {
		t.Fatalf("parsing test vectors: %v", err)
	}

	seed, err := strconv.ParseUint(file.Seed, 10, 64)
	if err != nil {
		t.Fatalf("parsing seed %q: %v", file.Seed, err)
	}
	if seed != PatientHashSeed {
		t.Fatalf("PatientHashSeed = %#x, vectors file seed = %#x", PatientHashSeed, seed)
	}
	if len(file.Vectors) == 0 {
		t.Fatal("vectors file contains no vectors")
	}

	for i, v := range file.Vectors {
		want, err := strconv.ParseUint(v.Hash, 10, 64)
		if err != nil {
			t.Errorf("vector %d: parsing hash %q: %v", i, v.Hash, err)
			continue
		}
		if got := PatientHash(v.Input); got != want {
			t.Errorf("vector %d (input length %d bytes): PatientHash = %d, want %d",
				i, len(v.Input), got, want)
		}
	}
}

var benchSink uint64

func BenchmarkPatientHash(b *testing.B) {
	id := "85.07.30-033.28X" // 16 bytes
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		benchSink = PatientHash(id)
	}
}
