// Command wardboard is an example service on the Go client: a ward's board over HTTP that reads
// a patient's record from Dossier and records a body height.
//
//	go run ./example/wardboard --seeds 127.0.0.1:7101 --listen 127.0.0.1:8088
//	curl 127.0.0.1:8088/patients/synth-1-7
//	curl -X POST '127.0.0.1:8088/patients/synth-1-7/height?cm=181&id=height-2026-12-03'
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http"
	"strings"
	"time"

	pb "dossier.internal/go/api/dossierv1"
	"dossier.internal/go/dossier"
	"google.golang.org/grpc/codes"
)

func main() {
	seeds := flag.String("seeds", "127.0.0.1:7101", "comma-separated gRPC addresses of a few Dossier nodes")
	listen := flag.String("listen", "127.0.0.1:8088", "HTTP address of this service")
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	client, err := dossier.Connect(ctx, dossier.DefaultConfig(strings.Split(*seeds, ",")...))
	cancel()
	if err != nil {
		log.Fatalf("wardboard: %v", err)
	}
	defer client.Close()
	board := &board{client: client}
	http.HandleFunc("/patients/", board.serve)
	log.Printf("wardboard: serving on http://%s (cluster of %d shards)", *listen, len(client.ClusterMap().Shards))
	log.Fatal(http.ListenAndServe(*listen, nil))
}

type board struct{ client *dossier.Client }

// summary is what the board shows of a patient: how many current records of each kind.
type summary struct {
	Patient string         `json:"patient"`
	Records map[string]int `json:"records"`
	AsOf    int64          `json:"as_of_micros"`
}

func (b *board) serve(w http.ResponseWriter, r *http.Request) {
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/patients/"), "/")
	switch {
	case len(parts) == 1 && r.Method == http.MethodGet:
		b.show(w, r, parts[0])
	case len(parts) == 2 && parts[1] == "height" && r.Method == http.MethodPost:
		b.recordHeight(w, r, parts[0])
	default:
		http.Error(w, "GET /patients/{id} or POST /patients/{id}/height?cm=..&id=..", http.StatusNotFound)
	}
}

func (b *board) show(w http.ResponseWriter, r *http.Request, patient string) {
	s := summary{Patient: patient, Records: map[string]int{}}
	asOf, err := b.client.Everything(r.Context(), patient, 0, func(resources []*pb.Resource) error {
		for _, res := range resources {
			s.Records[strings.TrimPrefix(fmt.Sprintf("%T", res.Kind), "*dossierv1.Resource_")]++
		}
		return nil
	})
	if err != nil {
		fail(w, err)
		return
	}
	s.AsOf = asOf
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(s)
}

func (b *board) recordHeight(w http.ResponseWriter, r *http.Request, patient string) {
	cm, id := r.URL.Query().Get("cm"), r.URL.Query().Get("id")
	obs := &pb.Resource{
		Meta: &pb.Meta{Id: id, PatientId: patient},
		Kind: &pb.Resource_Observation{Observation: &pb.Observation{
			Status: pb.ObservationStatus_OBSERVATION_STATUS_FINAL,
			Code:   &pb.CodeableConcept{Codings: []*pb.Coding{{System: "http://loinc.org", Code: "8302-2", Display: "Body height"}}},
			Effective: &pb.Observation_EffectiveTime{EffectiveTime: &pb.DateTime{
				UnixMicros: time.Now().UnixMicro(), Precision: pb.DatePrecision_DATE_PRECISION_TIME,
			}},
			Value: &pb.ObservationValue{Kind: &pb.ObservationValue_Quantity{Quantity: &pb.Quantity{
				Value: cm, Unit: "cm", System: "http://unitsofmeasure.org", Code: "cm",
			}}},
		}},
	}
	answer, err := b.client.CreateRecord(r.Context(), obs, dossier.WriteOptions{Author: &pb.Reference{Display: "wardboard"}})
	if err != nil {
		fail(w, err)
		return
	}
	if !dossier.Applied(answer) {
		// A definite refusal (exists, reference not found, ...): nothing was written.
		http.Error(w, fmt.Sprintf("not recorded: %s %s", answer.Outcome, answer.Field), http.StatusConflict)
		return
	}
	fmt.Fprintf(w, "recorded version %d\n", answer.Written[0].Version)
}

// fail answers with the HTTP status that fits the Dossier error.
func fail(w http.ResponseWriter, err error) {
	var e *dossier.Error
	code := http.StatusBadGateway
	if errors.As(err, &e) {
		switch e.Code {
		case codes.InvalidArgument:
			code = http.StatusBadRequest
		case codes.DeadlineExceeded, codes.Unavailable:
			code = http.StatusServiceUnavailable
		}
	}
	http.Error(w, err.Error(), code)
}
