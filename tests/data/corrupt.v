// A module whose text is cut off in the middle of the port list.
module corrupt4x4 (
    input  wire [3:0] a,
    input  wire [3:0
