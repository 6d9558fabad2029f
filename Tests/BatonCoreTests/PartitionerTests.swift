import BatonCore
import Testing

@Suite struct PartitionerTests {
    @Test(arguments: [
        ("a", UInt64(0xaf63_dc4c_8601_ec8c), 12),
        ("project:42/src/main.rs", 0x60d5_b37c_6a87_ed46, 6),
        ("channel:7", 0xa872_c4f5_096e_dbd7, 7),
        ("буфер/ü.rs", 0xec25_f925_0355_22f2, 2),
    ])
    func designVectors(buffer: String, hash: UInt64, partition: Int) throws {
        #expect(Partitioner.fnv1a64(buffer) == hash)
        #expect(try Partitioner(count: 16).partition(of: buffer) == partition)
    }

    @Test func emptyStringIsTheOffsetBasis() {
        #expect(Partitioner.fnv1a64("") == 0xcbf2_9ce4_8422_2325)
    }

    @Test(arguments: [0, -1, 1025])
    func countOutOfRangeIsRejected(count: Int) {
        #expect(throws: PartitionCountError(count: count)) { try Partitioner(count: count) }
        #expect(PartitionCountError(count: count).description.contains("\(count)"))
    }

    @Test func everyPartitionIsInRange() throws {
        let partitioner = try Partitioner(count: 7)
        for index in 0..<1000 {
            #expect((0..<7).contains(partitioner.partition(of: "buffer-\(index)")))
        }
    }

    @Test func partitionSets() throws {
        #expect(try PartitionSet(parsing: "all", count: 4).partitions == [0, 1, 2, 3])
        #expect(try PartitionSet(parsing: "0-15", count: 16).partitions == Array(0...15))
        #expect(try PartitionSet(parsing: "0,3,5-7", count: 16).partitions == [0, 3, 5, 6, 7])
        #expect(try PartitionSet(parsing: " 5-7 , 3,3 ", count: 16).partitions == [3, 5, 6, 7])
        #expect(try PartitionSet(parsing: "0,3,5-7", count: 16).description == "0,3,5-7")
    }

    @Test(arguments: ["", "16", "3-1", "a", "1-2-3", "-1", "0,,1"])
    func badPartitionSets(text: String) {
        #expect(throws: PartitionSetError.self) { try PartitionSet(parsing: text, count: 16) }
    }

    @Test func badPartitionSetMessageNamesTheValue() {
        do {
            _ = try PartitionSet(parsing: "0-20", count: 16)
            Issue.record("expected an error")
        } catch {
            #expect(error.description.contains("0-20"))
            #expect(error.description.contains("0-15"))
        }
    }
}
