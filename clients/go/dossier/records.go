package dossier

import (
	"context"
	"io"

	pb "dossier.internal/go/api/dossierv1"
	"google.golang.org/grpc"
)

// WriteOptions are a records write's author and, when the caller keeps its own exactly-once
// key (an import deriving it from the source), its request id.
type WriteOptions struct {
	// Who writes; becomes Meta.author.
	Author *pb.Reference
	// 16 bytes, not all zero; nil: drawn once for this call (NewRequestID).
	RequestID []byte
}

// Applied is true when a records write was applied (now, or by an earlier attempt with the same
// request id: then Replayed is set). Any other outcome is a definite refusal: nothing was written.
func Applied(w *pb.RecordWriteResponse) bool {
	return w.Outcome == pb.WriteOutcome_WRITE_OUTCOME_APPLIED
}

// CreatePatient creates a patient (route, meta.id and meta.patient_id are the patient id) and
// claims its indexed identifiers in the master patient index.
func (c *Client) CreatePatient(ctx context.Context, patient *pb.Resource, opts WriteOptions) (*pb.RecordWriteResponse, error) {
	id := patient.GetMeta().GetId()
	return c.recordsWrite(ctx, id, opts, func(ctx context.Context, r pb.RecordsClient, route *pb.RouteHeader, h *pb.WriteHeader) (*pb.RecordWriteResponse, error) {
		return r.CreatePatient(ctx, &pb.CreatePatientRequest{Route: route, Header: h, Resource: patient})
	})
}

// CreateRecord creates a record of the patient named by resource.meta.patient_id.
func (c *Client) CreateRecord(ctx context.Context, resource *pb.Resource, opts WriteOptions) (*pb.RecordWriteResponse, error) {
	return c.recordsWrite(ctx, resource.GetMeta().GetPatientId(), opts, func(ctx context.Context, r pb.RecordsClient, route *pb.RouteHeader, h *pb.WriteHeader) (*pb.RecordWriteResponse, error) {
		return r.Create(ctx, &pb.CreateRecordRequest{Route: route, Header: h, Resource: resource})
	})
}

// UpdateRecord writes a new version of a record if its current version is expectedVersion
// (VERSION_CONFLICT with the current version otherwise).
func (c *Client) UpdateRecord(ctx context.Context, resource *pb.Resource, expectedVersion uint64, opts WriteOptions) (*pb.RecordWriteResponse, error) {
	return c.recordsWrite(ctx, resource.GetMeta().GetPatientId(), opts, func(ctx context.Context, r pb.RecordsClient, route *pb.RouteHeader, h *pb.WriteHeader) (*pb.RecordWriteResponse, error) {
		return r.Update(ctx, &pb.UpdateRecordRequest{Route: route, Header: h, ExpectedVersion: expectedVersion, Resource: resource})
	})
}

// DeleteRecord marks a record entered-in-error (records are never erased), if its current version
// is expectedVersion.
func (c *Client) DeleteRecord(ctx context.Context, patientID string, rtype pb.ResourceType, id string, expectedVersion uint64, reason string, opts WriteOptions) (*pb.RecordWriteResponse, error) {
	return c.recordsWrite(ctx, patientID, opts, func(ctx context.Context, r pb.RecordsClient, route *pb.RouteHeader, h *pb.WriteHeader) (*pb.RecordWriteResponse, error) {
		return r.Delete(ctx, &pb.DeleteRecordRequest{Route: route, Header: h, Type: rtype, Id: id, ExpectedVersion: expectedVersion, Reason: reason})
	})
}

// Transaction applies entries on one patient's records atomically.
func (c *Client) Transaction(ctx context.Context, patientID string, entries []*pb.TransactionEntry, opts WriteOptions) (*pb.RecordWriteResponse, error) {
	return c.recordsWrite(ctx, patientID, opts, func(ctx context.Context, r pb.RecordsClient, route *pb.RouteHeader, h *pb.WriteHeader) (*pb.RecordWriteResponse, error) {
		return r.Transaction(ctx, &pb.TransactionRequest{Route: route, Header: h, Entries: entries})
	})
}

// ReadRecord reads the current version of a record, linearizably; nil when there is none.
func (c *Client) ReadRecord(ctx context.Context, patientID string, rtype pb.ResourceType, id string) (*pb.Resource, error) {
	var answer *pb.ReadRecordResponse
	err := c.routed(ctx, patientID, func(ctx context.Context, conn *grpc.ClientConn, route *pb.RouteHeader) error {
		var err error
		answer, err = pb.NewRecordsClient(conn).Read(ctx, &pb.ReadRecordRequest{
			Route: route, Type: rtype, Id: id, Consistency: pb.ReadConsistency_READ_CONSISTENCY_LINEARIZABLE,
		})
		return err
	})
	if err != nil || !answer.Found {
		return nil, err
	}
	return answer.Resource, nil
}

// AccessLog returns a page of the patient's audit chain after entry afterSeq (0: from the
// first), at most limit entries (0: the server's page): who accessed the record, hash-chained
// (docs/client-protocol.md §12). Linearizable; for the patient, auditors and services.
func (c *Client) AccessLog(ctx context.Context, patientID string, afterSeq uint64, limit uint32) (*pb.AccessLogResponse, error) {
	var answer *pb.AccessLogResponse
	err := c.routed(ctx, patientID, func(ctx context.Context, conn *grpc.ClientConn, route *pb.RouteHeader) error {
		var err error
		answer, err = pb.NewRecordsClient(conn).AccessLog(ctx, &pb.AccessLogRequest{
			Route: route, AfterSeq: afterSeq, Limit: limit, Consistency: pb.ReadConsistency_READ_CONSISTENCY_LINEARIZABLE,
		})
		return err
	})
	return answer, err
}

// LookupIdentifier finds the patient holding an identifier of an indexed system (the master
// patient index); found is false when none does.
func (c *Client) LookupIdentifier(ctx context.Context, system, value string) (patientID string, found bool, err error) {
	var answer *pb.LookupIdentifierResponse
	err = c.routed(ctx, "mpi:"+system+"|"+value, func(ctx context.Context, conn *grpc.ClientConn, route *pb.RouteHeader) error {
		var err error
		answer, err = pb.NewRecordsClient(conn).LookupIdentifier(ctx, &pb.LookupIdentifierRequest{
			Route: route, System: system, Value: value, Consistency: pb.ReadConsistency_READ_CONSISTENCY_LINEARIZABLE,
		})
		return err
	})
	if err != nil {
		return "", false, err
	}
	return answer.PatientId, answer.Found, nil
}

// Search finds records of one patient (request.Route is set by the client).
func (c *Client) Search(ctx context.Context, patientID string, request *pb.SearchRequest) (*pb.SearchResponse, error) {
	var answer *pb.SearchResponse
	err := c.routed(ctx, patientID, func(ctx context.Context, conn *grpc.ClientConn, route *pb.RouteHeader) error {
		r := &pb.SearchRequest{
			Route: route, Type: request.Type, Code: request.Code, SinceMicros: request.SinceMicros,
			UntilMicros: request.UntilMicros, Statuses: request.Statuses, Limit: request.Limit,
			PageToken: request.PageToken, Consistency: request.Consistency,
		}
		var err error
		answer, err = pb.NewRecordsClient(conn).Search(ctx, r)
		return err
	})
	return answer, err
}

// Everything streams every current record of a patient changed after sinceMicros (0: all), in
// messages of bounded size, to each; it returns the as-of stamp to pass as sinceMicros next
// time. The stream is opened through the router (hints, map refreshes); a stream that breaks
// after its first message is an error the caller resumes with since = the last record's
// last_updated_micros.
func (c *Client) Everything(ctx context.Context, patientID string, sinceMicros int64, each func([]*pb.Resource) error) (int64, error) {
	ctx, cancel := c.withDeadline(ctx)
	defer cancel()
	var stream pb.Records_EverythingClient
	var first *pb.EverythingResponse
	var streamCancel context.CancelFunc = func() {}
	defer func() { streamCancel() }()
	err := c.routed(ctx, patientID, func(_ context.Context, conn *grpc.ClientConn, route *pb.RouteHeader) error {
		// The stream outlives the attempt: it runs under the request's deadline.
		streamCtx, cancel := context.WithCancel(ctx)
		s, err := pb.NewRecordsClient(conn).Everything(streamCtx, &pb.EverythingRequest{
			Route: route, SinceMicros: sinceMicros, Consistency: pb.ReadConsistency_READ_CONSISTENCY_LINEARIZABLE,
		})
		if err == nil {
			first, err = s.Recv()
		}
		if err != nil && err != io.EOF {
			cancel()
			return err
		}
		stream, streamCancel = s, cancel
		if err == io.EOF {
			first = nil
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	asOf := sinceMicros
	for message := first; message != nil; {
		asOf = message.AsOfMicros
		if err := each(message.Resources); err != nil {
			return asOf, err
		}
		next, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return asOf, &Error{Code: codeOf(err), Detail: DetailOf(err), Message: "the Everything stream broke: " + err.Error(), Attempts: 1}
		}
		message = next
	}
	return asOf, nil
}

// recordsWrite runs a records write with one request id for every attempt.
func (c *Client) recordsWrite(ctx context.Context, patientID string, opts WriteOptions, send func(context.Context, pb.RecordsClient, *pb.RouteHeader, *pb.WriteHeader) (*pb.RecordWriteResponse, error)) (*pb.RecordWriteResponse, error) {
	requestID := opts.RequestID
	if requestID == nil {
		requestID = NewRequestID()
	}
	header := &pb.WriteHeader{RequestId: requestID, Author: opts.Author}
	var answer *pb.RecordWriteResponse
	err := c.routed(ctx, patientID, func(ctx context.Context, conn *grpc.ClientConn, route *pb.RouteHeader) error {
		var err error
		answer, err = send(ctx, pb.NewRecordsClient(conn), route, header)
		return err
	})
	return answer, err
}
