package dossier_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	pb "dossier.internal/go/api/dossierv1"
	"dossier.internal/go/dossier"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The conformance scenario (docs/client-protocol.md, "Conformance"), against a real 3-node
// cluster of 8 shards: the cluster map, put/get, compare-and-set, errors with their details, a
// patient created, read and updated with a version conflict, Everything streamed, a bundle, and
// writes that go on across a shard leader's SIGKILL.
func TestConformance(t *testing.T) {
	cluster := startCluster(t, 3, 8)
	ctx := context.Background()
	client, err := dossier.Connect(ctx, dossier.DefaultConfig(cluster.seeds()...))
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer client.Close()

	t.Run("cluster map", func(t *testing.T) {
		m := client.ClusterMap()
		if len(m.Nodes) != 3 || len(m.Shards) != 8 {
			t.Fatalf("want 3 nodes and 8 shards, got %d and %d", len(m.Nodes), len(m.Shards))
		}
		// The shards cover the hash space without gap or overlap, 3 replicas each.
		next := uint64(0)
		for i, d := range m.Shards {
			if d.HashLo != next || len(d.Replicas) != 3 {
				t.Fatalf("shard %d: range starts at %d (want %d), %d replicas", d.ShardId, d.HashLo, next, len(d.Replicas))
			}
			if i == len(m.Shards)-1 && !d.HashHiMax {
				t.Fatalf("the last shard must run to the end of the space")
			}
			next = d.HashHi
		}
	})

	t.Run("put and get", func(t *testing.T) {
		w, err := client.Put(ctx, "go-p1", []byte("allergies"), []byte("penicillin"))
		if err != nil || !w.Applied || w.Index == 0 {
			t.Fatalf("put: %+v %v", w, err)
		}
		v, found, err := client.Get(ctx, "go-p1", []byte("allergies"))
		if err != nil || !found || string(v) != "penicillin" {
			t.Fatalf("get: %q %v %v", v, found, err)
		}
		_, found, err = client.Get(ctx, "go-p1", []byte("absent"))
		if err != nil || found {
			t.Fatalf("get of an absent key: found=%v err=%v", found, err)
		}
	})

	t.Run("compare and set", func(t *testing.T) {
		w, err := client.CompareAndSet(ctx, "go-p2", []byte("bed"), nil, []byte("A12"))
		if err != nil || !w.Applied {
			t.Fatalf("cas from absent: %+v %v", w, err)
		}
		w, err = client.CompareAndSet(ctx, "go-p2", []byte("bed"), []byte("B7"), []byte("C3"))
		if err != nil || w.Applied || w.FailedCondition != 0 {
			t.Fatalf("cas with a wrong expected value must not apply: %+v %v", w, err)
		}
		w, err = client.CompareAndSet(ctx, "go-p2", []byte("bed"), []byte("A12"), []byte("C3"))
		if err != nil || !w.Applied {
			t.Fatalf("cas with the right expected value: %+v %v", w, err)
		}
		v, _, _ := client.Get(ctx, "go-p2", []byte("bed"))
		if string(v) != "C3" {
			t.Fatalf("bed is %q, want C3", v)
		}
	})

	t.Run("errors carry the standard model", func(t *testing.T) {
		// Through the client: an invalid patient id is final, with its field.
		_, err := client.Put(ctx, "not a valid id!", []byte("k"), []byte("v"))
		var e *dossier.Error
		if !asError(err, &e) || e.Code != codes.InvalidArgument || e.Reason() != pb.ErrorReason_ERROR_REASON_INVALID_ARGUMENT {
			t.Fatalf("want INVALID_ARGUMENT, got %v", err)
		}
		if e.Detail.Field != "route.patient_id" {
			t.Fatalf("the detail names the field: %q", e.Detail.Field)
		}
		// Raw gRPC: grpc-go's own status.Details() reads the ErrorDetail and BadRequest.
		conn, _ := client.Conn(cluster.nodes[0].grpc)
		_, err = pb.NewKvClient(conn).Put(ctx, &pb.PutRequest{Route: &pb.RouteHeader{PatientId: "bad id"}, Key: []byte("k")})
		st := status.Convert(err)
		var sawDetail, sawBadRequest bool
		for _, d := range st.Details() {
			switch d := d.(type) {
			case *pb.ErrorDetail:
				sawDetail = d.Reason == pb.ErrorReason_ERROR_REASON_INVALID_ARGUMENT
			case *errdetails.BadRequest:
				sawBadRequest = len(d.FieldViolations) == 1 && d.FieldViolations[0].Field == "route.patient_id"
			}
		}
		if st.Code() != codes.InvalidArgument || !sawDetail || !sawBadRequest {
			t.Fatalf("want InvalidArgument with ErrorDetail and BadRequest, got %v %v", st.Code(), st.Details())
		}
		// A stale epoch: FAILED_PRECONDITION, STALE_EPOCH and the descriptor to route with.
		d, _ := client.ShardOf("go-p1")
		// An epoch newer than the node's map: the node is behind, UNAVAILABLE (retry).
		_, err = pb.NewKvClient(conn).Get(ctx, &pb.GetRequest{Route: &pb.RouteHeader{ShardId: d.ShardId, Epoch: d.Epoch + 7, PatientId: "go-p1"}, Key: []byte("k")})
		if status.Code(err) != codes.Unavailable || dossier.DetailOf(err).GetReason() != pb.ErrorReason_ERROR_REASON_UNAVAILABLE {
			t.Fatalf("want UNAVAILABLE for a future epoch, got %v", err)
		}
		other := d.ShardId%8 + 1
		_, err = pb.NewKvClient(conn).Get(ctx, &pb.GetRequest{Route: &pb.RouteHeader{ShardId: other, Epoch: 1, PatientId: "go-p1"}, Key: []byte("k")})
		detail := dossier.DetailOf(err)
		if status.Code(err) != codes.FailedPrecondition || detail.GetReason() != pb.ErrorReason_ERROR_REASON_STALE_EPOCH || detail.GetShard().GetShardId() != d.ShardId {
			t.Fatalf("want STALE_EPOCH naming shard %d, got %v (%v)", d.ShardId, err, detail)
		}
		// An unknown shard: NOT_FOUND, SHARD_NOT_FOUND, and still the descriptor to route with.
		_, err = pb.NewKvClient(conn).Get(ctx, &pb.GetRequest{Route: &pb.RouteHeader{ShardId: 999, Epoch: 1, PatientId: "go-p1"}, Key: []byte("k")})
		detail = dossier.DetailOf(err)
		if status.Code(err) != codes.NotFound || detail.GetReason() != pb.ErrorReason_ERROR_REASON_SHARD_NOT_FOUND || detail.GetShard().GetShardId() != d.ShardId {
			t.Fatalf("want SHARD_NOT_FOUND naming shard %d, got %v (%v)", d.ShardId, err, detail)
		}
	})

	t.Run("patient create, read, update with a version conflict", func(t *testing.T) {
		id := "go-patient-1"
		patient := &pb.Resource{
			Meta: &pb.Meta{Id: id, PatientId: id},
			Kind: &pb.Resource_Patient{Patient: &pb.Patient{
				Names:     []*pb.HumanName{{Family: "Peeters", Given: []string{"An"}}},
				Gender:    pb.AdministrativeGender_ADMINISTRATIVE_GENDER_FEMALE,
				BirthDate: &pb.Date{Year: 1985, Month: 7, Day: 30},
			}},
		}
		author := &pb.Reference{Display: "Dr. Go"}
		w, err := client.CreatePatient(ctx, patient, dossier.WriteOptions{Author: author})
		if err != nil || !dossier.Applied(w) || w.Written[0].Version != 1 {
			t.Fatalf("create patient: %v %v", w, err)
		}
		again, err := client.CreatePatient(ctx, patient, dossier.WriteOptions{Author: author})
		if err != nil || again.Outcome != pb.WriteOutcome_WRITE_OUTCOME_ALREADY_EXISTS {
			t.Fatalf("a second create is ALREADY_EXISTS: %v %v", again, err)
		}
		read, err := client.ReadRecord(ctx, id, pb.ResourceType_RESOURCE_TYPE_PATIENT, id)
		if err != nil || read == nil || read.GetPatient().Names[0].Family != "Peeters" || read.Meta.Version != 1 {
			t.Fatalf("read: %v %v", read, err)
		}
		// The version to expect travels beside the resource; meta's server-set fields stay unset.
		read.GetPatient().Names[0].Family = "Peeters-Janssens"
		read.Meta = &pb.Meta{Id: id, PatientId: id}
		w, err = client.UpdateRecord(ctx, read, 1, dossier.WriteOptions{Author: author})
		if err != nil || !dossier.Applied(w) || w.Written[0].Version != 2 {
			t.Fatalf("update at version 1: %v %v", w, err)
		}
		w, err = client.UpdateRecord(ctx, read, 1, dossier.WriteOptions{Author: author})
		if err != nil || w.Outcome != pb.WriteOutcome_WRITE_OUTCOME_VERSION_CONFLICT || w.CurrentVersion != 2 {
			t.Fatalf("a second update at version 1 is a VERSION_CONFLICT at 2: %v %v", w, err)
		}
		// A retried write (same request id) is answered as the first was, and applied once.
		requestID := dossier.NewRequestID()
		obs := observation(id, "go-obs-1", "180")
		first, err := client.CreateRecord(ctx, obs, dossier.WriteOptions{Author: author, RequestID: requestID})
		if err != nil || !dossier.Applied(first) {
			t.Fatalf("create observation: %v %v", first, err)
		}
		retried, err := client.CreateRecord(ctx, obs, dossier.WriteOptions{Author: author, RequestID: requestID})
		if err != nil || !dossier.Applied(retried) || !retried.Replayed {
			t.Fatalf("a retry with the same request id is APPLIED and replayed: %v %v", retried, err)
		}
	})

	t.Run("everything streamed", func(t *testing.T) {
		id := "go-patient-1"
		var kinds []string
		asOf, err := client.Everything(ctx, id, 0, func(resources []*pb.Resource) error {
			for _, r := range resources {
				kinds = append(kinds, fmt.Sprintf("%T", r.Kind))
			}
			return nil
		})
		if err != nil || len(kinds) != 2 || asOf == 0 {
			t.Fatalf("everything: %v (as of %d) %v", kinds, asOf, err)
		}
		// Nothing changed since: an incremental sync gets nothing.
		n := 0
		_, err = client.Everything(ctx, id, asOf, func(resources []*pb.Resource) error { n += len(resources); return nil })
		if err != nil || n != 0 {
			t.Fatalf("everything since %d: %d records, %v", asOf, n, err)
		}
	})

	t.Run("bundle", func(t *testing.T) {
		b := client.NewBundle()
		for i := 0; i < 6; i++ {
			b.Put(fmt.Sprintf("go-b%d", i), []byte("k"), []byte(fmt.Sprintf("v%d", i)))
		}
		answers, err := b.Send(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for i, a := range answers {
			if a.Err != nil || !a.Write.Applied {
				t.Fatalf("item %d: %+v", i, a)
			}
		}
		b = client.NewBundle()
		for i := 0; i < 6; i++ {
			b.Get(fmt.Sprintf("go-b%d", i), []byte("k"))
		}
		answers, err = b.Send(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for i, a := range answers {
			if a.Err != nil || !a.Found || string(a.Value) != fmt.Sprintf("v%d", i) {
				t.Fatalf("item %d: %+v", i, a)
			}
		}
	})

	t.Run("a leader's SIGKILL loses no acknowledged write", func(t *testing.T) {
		patient := "go-failover"
		d, _ := client.ShardOf(patient)
		leader := waitForLeader(t, cluster, d.ShardId)
		stop := make(chan struct{})
		type acked struct {
			key, value []byte
		}
		results := make(chan []acked)
		var longest time.Duration
		go func() {
			var done []acked
			last := time.Now()
			for i := 0; ; i++ {
				select {
				case <-stop:
					results <- done
					return
				default:
				}
				key, value := []byte(fmt.Sprintf("k%04d", i)), []byte(fmt.Sprintf("v%d", i))
				if _, err := client.Put(ctx, patient, key, value); err != nil {
					t.Errorf("put %s failed across the leader's loss: %v", key, err)
					continue
				}
				if gap := time.Since(last); gap > longest {
					longest = gap
				}
				last = time.Now()
				done = append(done, acked{key, value})
			}
		}()
		time.Sleep(time.Second)
		cluster.kill(leader)
		time.Sleep(4 * time.Second)
		close(stop)
		done := <-results
		t.Logf("%d writes acknowledged; the longest wait between two was %v (the leader of shard %d, node %d, was killed)", len(done), longest, d.ShardId, leader.id)
		if len(done) < 10 {
			t.Fatalf("only %d writes were acknowledged", len(done))
		}
		for _, a := range done {
			v, found, err := client.Get(ctx, patient, a.key)
			if err != nil || !found || !bytes.Equal(v, a.value) {
				t.Fatalf("acknowledged write %s lost: %q %v %v", a.key, v, found, err)
			}
		}
		cluster.start(leader)
	})
}

func waitForLeader(t *testing.T, cluster *testCluster, shard uint64) *testNode {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if leader := cluster.leaderOf(shard); leader != nil {
			return leader
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("shard %d has no leader", shard)
	return nil
}

func observation(patient, id, heightCm string) *pb.Resource {
	return &pb.Resource{
		Meta: &pb.Meta{Id: id, PatientId: patient},
		Kind: &pb.Resource_Observation{Observation: &pb.Observation{
			Status: pb.ObservationStatus_OBSERVATION_STATUS_FINAL,
			Code:   &pb.CodeableConcept{Codings: []*pb.Coding{{System: "http://loinc.org", Code: "8302-2", Display: "Body height"}}},
			Effective: &pb.Observation_EffectiveTime{EffectiveTime: &pb.DateTime{
				UnixMicros: time.Date(2026, 11, 30, 9, 0, 0, 0, time.UTC).UnixMicro(),
				Precision:  pb.DatePrecision_DATE_PRECISION_TIME,
			}},
			Value: &pb.ObservationValue{Kind: &pb.ObservationValue_Quantity{Quantity: &pb.Quantity{
				Value: heightCm, Unit: "cm", System: "http://unitsofmeasure.org", Code: "cm",
			}}},
		}},
	}
}

func asError(err error, target **dossier.Error) bool {
	e, ok := err.(*dossier.Error)
	if ok {
		*target = e
	}
	return ok
}
